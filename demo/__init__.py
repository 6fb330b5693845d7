"""The end-to-end demo (``make demo``) and its HTML report.

It sits above both packages: it builds a crawl and curates it (``curation``), trains and evaluates
on the result (``dinov2``), and reads both sides' outputs for the report.  Neither package imports it.
"""
