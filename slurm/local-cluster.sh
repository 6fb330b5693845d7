#!/usr/bin/env bash
# One-node SLURM cluster on localhost, for tests and local experiments.
#
#   slurm/local-cluster.sh up       install (apt-get) if needed, start munged, MariaDB, slurmdbd,
#                                   slurmctld, slurmd; print the `export SLURM_CONF=...` line
#   slurm/local-cluster.sh down     cancel this cluster's jobs, stop its daemons by their PID files
#   slurm/local-cluster.sh status   show which daemons run, `sinfo`, and the export line
#   slurm/local-cluster.sh env      print only the `export SLURM_CONF=...` line
#
# Everything (configs, munge key and socket, SLURM state/spool, MariaDB datadir, pid and log files)
# lives under one folder the script owns:
#   SLURM_LOCAL_DIR      folder (default: $PWD/.slurm-local)
#   SLURM_LOCAL_PORT     first of 4 TCP ports on 127.0.0.1 (slurmctld, slurmd, slurmdbd, MariaDB);
#                        default derived from the folder path, then moved past ports in use.
#                        Chosen once, remembered in $SLURM_LOCAL_DIR/etc/ports.env.
#   SLURM_LOCAL_CRED_EXPIRE  seconds a requeued job waits before it may start again (default 10;
#                        SLURM's default is 120)
#   SLURM_LOCAL_CPUS     CPUs the node advertises (default: nproc)
#   SLURM_LOCAL_MEM_MB   memory the node advertises (default: MemTotal - 1 GiB)
#
# `up` is idempotent: running daemons are left alone, missing ones are started.  Exit status:
# 0 ok, 2 usage, 3 SLURM cannot be installed here (not root / no apt-get), 1 any other failure.
set -euo pipefail

readonly PACKAGES=(slurmctld slurmd slurm-client slurmdbd munge mariadb-server)
# Binaries that prove the packages above are installed.
readonly BINARIES=(slurmctld slurmd sbatch srun sacct sacctmgr slurmdbd munged mariadbd mariadb-install-db mariadb)

die() { echo "local-cluster: $*" >&2; exit 1; }
log() { echo "local-cluster: $*" >&2; }

case "${1:-}" in
  up|down|status|env) ;;
  *) echo "usage: $0 up|down|status|env" >&2; exit 2 ;;
esac

DIR_ARG="${SLURM_LOCAL_DIR:-$PWD/.slurm-local}"
[[ "$1" == up ]] && mkdir -p "$DIR_ARG"
DIR="$(realpath -m "$DIR_ARG")"
ETC="$DIR/etc" RUN="$DIR/run" LOGD="$DIR/log" STATE="$DIR/state" SPOOL="$DIR/spool"
MUNGE_DIR="$DIR/munge" DB_DIR="$DIR/mariadb"
# The cluster name must be short and lower case; derive it from the folder so two clusters in
# different folders never share accounting rows.
CLUSTER="local$(printf '%s' "$DIR" | cksum | cut -c1-6)"

export SLURM_CONF="$ETC/slurm.conf"

# ---------------------------------------------------------------- helpers
proc_running() {  # proc_running PID -> 0 when PID runs (a zombie waiting to be reaped does not)
  local state
  state="$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" || return 1
  [[ -n "$state" && "$state" != Z && "$state" != X ]]
}

pid_alive() {  # pid_alive PIDFILE -> 0 when the process named in PIDFILE is running
  local f="$1" pid
  [[ -s "$f" ]] || return 1
  pid="$(tr -dc '0-9' < "$f")"
  [[ -n "$pid" ]] && proc_running "$pid"
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND... : poll COMMAND until it succeeds
  local timeout="$1" what="$2"; shift 2
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    if (( SECONDS >= deadline )); then die "timed out after ${timeout}s waiting for $what"; fi
    sleep 0.2
  done
}

port_free() {  # port_free PORT -> 0 when nothing listens on 127.0.0.1:PORT
  ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

port_open() { ! port_free "$1"; }

install_packages() {
  local missing=() b
  for b in "${BINARIES[@]}"; do command -v "$b" >/dev/null 2>&1 || missing+=("$b"); done
  (( ${#missing[@]} == 0 )) && return 0
  log "missing: ${missing[*]}; installing ${PACKAGES[*]}"
  if [[ "$(id -u)" != 0 ]]; then
    echo "local-cluster: SLURM is not installed and installing it needs root" >&2; exit 3
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "local-cluster: SLURM is not installed and apt-get is not available" >&2; exit 3
  fi
  mkdir -p "$LOGD"
  # policy-rc.d / missing systemd make the postinst scripts skip starting services: that is what
  # we want, the daemons below run with private paths only.
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
           --no-install-recommends "${PACKAGES[@]}"; } >"$LOGD/apt.log" 2>&1; then
    echo "local-cluster: apt-get failed (see $LOGD/apt.log):" >&2
    tail -5 "$LOGD/apt.log" >&2
    exit 3
  fi
}

choose_ports() {
  if [[ -s "$ETC/ports.env" ]]; then
    # shellcheck disable=SC1091
    source "$ETC/ports.env"; return 0
  fi
  local base
  if [[ -n "${SLURM_LOCAL_PORT:-}" ]]; then
    base="$SLURM_LOCAL_PORT"
  else
    # Spread folders over 10000..29999 (below Linux's ephemeral range) so parallel clusters
    # rarely collide, then skip busy ports.
    base=$(( 10000 + ($(printf '%s' "$DIR" | cksum | cut -d' ' -f1) % 5000) * 4 ))
    local tries=0
    until port_free "$base" && port_free $((base + 1)) && port_free $((base + 2)) \
          && port_free $((base + 3)); do
      base=$((base + 4)); tries=$((tries + 1))
      (( base > 29996 )) && base=10000
      (( tries > 1000 )) && die "no 4 free consecutive ports found"
    done
  fi
  CTLD_PORT=$base SLURMD_PORT=$((base + 1)) DBD_PORT=$((base + 2)) DB_PORT=$((base + 3))
  mkdir -p "$ETC"
  printf 'CTLD_PORT=%s\nSLURMD_PORT=%s\nDBD_PORT=%s\nDB_PORT=%s\n' \
    "$CTLD_PORT" "$SLURMD_PORT" "$DBD_PORT" "$DB_PORT" > "$ETC/ports.env.tmp"
  mv "$ETC/ports.env.tmp" "$ETC/ports.env"
}

write_file() {  # write_file PATH MODE < content : atomic, so a killed `up` never leaves half a config
  local path="$1" mode="$2"
  cat > "$path.tmp"
  chmod "$mode" "$path.tmp"
  mv "$path.tmp" "$path"
}

# ---------------------------------------------------------------- munge
start_munge() {
  if pid_alive "$RUN/munged.pid"; then return 0; fi
  mkdir -p "$MUNGE_DIR"
  chmod 700 "$MUNGE_DIR"
  if [[ ! -s "$MUNGE_DIR/munge.key" ]]; then
    head -c 1024 /dev/urandom > "$MUNGE_DIR/munge.key.tmp"
    chmod 600 "$MUNGE_DIR/munge.key.tmp"
    mv "$MUNGE_DIR/munge.key.tmp" "$MUNGE_DIR/munge.key"
  fi
  # The socket's folder must be world-readable (munged checks it); the key folder stays private.
  mkdir -p "$RUN/munge"; chmod 755 "$RUN" "$RUN/munge"
  rm -f "$RUN/munge/munge.socket.2" "$RUN/munge/munge.socket.2.lock"
  # --force: munged refuses to run as root otherwise.
  munged --force --key-file="$MUNGE_DIR/munge.key" --socket="$RUN/munge/munge.socket.2" \
    --pid-file="$RUN/munged.pid" --log-file="$LOGD/munged.log" --seed-file="$MUNGE_DIR/munged.seed" \
    || die "munged failed to start (see $LOGD/munged.log)"
  wait_for 20 "munged" test -S "$RUN/munge/munge.socket.2"
}

# ---------------------------------------------------------------- MariaDB
mysql_cli() { mariadb --no-defaults --protocol=socket --socket="$RUN/mariadb.sock" -uroot "$@"; }

start_mariadb() {
  if pid_alive "$RUN/mariadbd.pid"; then return 0; fi
  if [[ ! -d "$DB_DIR/mysql" ]]; then
    rm -rf "$DB_DIR.init"
    mkdir -p "$DB_DIR.init"
    # root@localhost without a password over the private socket only (no TCP for root: we create
    # a dedicated user for slurmdbd below).  Build into a side folder, then rename: a killed `up`
    # never leaves a half-initialised datadir behind.
    mariadb-install-db --no-defaults --datadir="$DB_DIR.init" --user=root \
      --auth-root-authentication-method=normal --skip-test-db >"$LOGD/mariadb-install.log" 2>&1 \
      || die "mariadb-install-db failed (see $LOGD/mariadb-install.log)"
    mv "$DB_DIR.init" "$DB_DIR"
  fi
  rm -f "$RUN/mariadb.sock"
  # --no-defaults: ignore /etc/mysql so nothing points at the system datadir or socket.
  nohup mariadbd --no-defaults --user=root --datadir="$DB_DIR" --socket="$RUN/mariadb.sock" \
    --port="$DB_PORT" --bind-address=127.0.0.1 --skip-name-resolve --pid-file="$RUN/mariadbd.pid" \
    --log-error="$LOGD/mariadbd.log" --innodb-buffer-pool-size=64M --innodb-log-file-size=16M \
    --max-connections=50 --performance-schema=OFF >/dev/null 2>&1 &
  wait_for 60 "MariaDB (see $LOGD/mariadbd.log)" mysql_cli -e 'SELECT 1'
  wait_for 10 "MariaDB pid file" test -s "$RUN/mariadbd.pid"
}

setup_db_user() {
  if [[ ! -s "$ETC/db.pass" ]]; then
    head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | write_file "$ETC/db.pass" 600
  fi
  local pass; pass="$(cat "$ETC/db.pass")"
  mysql_cli <<SQL || die "could not create the slurm database user"
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
FLUSH PRIVILEGES;
SQL
}

# ---------------------------------------------------------------- SLURM configs
write_configs() {
  local cpus mem_mb
  cpus="${SLURM_LOCAL_CPUS:-$(nproc)}"
  mem_mb="${SLURM_LOCAL_MEM_MB:-$(( $(awk '/^MemTotal:/ {print int($2/1024)}' /proc/meminfo) - 1024 ))}"
  (( mem_mb > 256 )) || mem_mb=256
  # cred_expire also sets how long a requeued job waits before it may start again (default 120 s):
  # short here so preemption/requeue tests finish quickly.
  local auth="AuthType=auth/munge
AuthInfo=socket=$RUN/munge/munge.socket.2,cred_expire=${SLURM_LOCAL_CRED_EXPIRE:-10}"

  write_file "$ETC/slurmdbd.conf" 600 <<EOF
# Generated by slurm/local-cluster.sh for $DIR
$auth
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$RUN/slurmdbd.pid
LogFile=$LOGD/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$(cat "$ETC/db.pass")
StorageLoc=slurm_acct_db
EOF

  # No cgroups in this sandbox: linuxproc tracking, no task plugin, no accounting gatherer.
  # SlurmdParameters=config_overrides lets SLURM_LOCAL_CPUS/MEM differ from the hardware.
  write_file "$ETC/slurm.conf" 644 <<EOF
# Generated by slurm/local-cluster.sh for $DIR
ClusterName=$CLUSTER
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
$auth
CryptoType=crypto/munge
MailProg=/bin/true
StateSaveLocation=$STATE
SlurmdSpoolDir=$SPOOL/slurmd-%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOGD/slurmctld.log
SlurmdLogFile=$LOGD/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SlurmdParameters=config_overrides
# Without a default every job would claim the whole node's memory and jobs could not share it.
DefMemPerCPU=$(( mem_mb / cpus ))
ReturnToService=2
MinJobAge=300
# Test pending jobs every 2 s (default 60 s): a requeued job starts as soon as it is eligible.
SchedulerParameters=sched_interval=2
KillWait=10
# Jobs that time out or get preempted have this long between SIGTERM and SIGKILL.
UnkillableStepTimeout=60
MpiDefault=none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
# For connections to slurmdbd, SLURM takes the munge socket from here, not from AuthInfo.
AccountingStoragePass=$RUN/munge/munge.socket.2
JobCompType=jobcomp/none
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
}

# ---------------------------------------------------------------- SLURM daemons
start_slurmdbd() {
  if ! pid_alive "$RUN/slurmdbd.pid"; then
    # slurmdbd reads slurmdbd.conf from the folder of $SLURM_CONF.
    slurmdbd || die "slurmdbd failed to start (see $LOGD/slurmdbd.log)"
  fi
  wait_for 60 "slurmdbd (see $LOGD/slurmdbd.log)" port_open "$DBD_PORT"
  # Register the cluster before slurmctld connects, so accounting starts with the first job.
  if ! sacctmgr -n -P list cluster format=cluster 2>/dev/null | grep -qx "$CLUSTER"; then
    sacctmgr -i add cluster "$CLUSTER" >/dev/null || die "sacctmgr add cluster $CLUSTER failed"
  fi
}

start_slurmctld() {
  if pid_alive "$RUN/slurmctld.pid"; then return 0; fi
  mkdir -p "$STATE"
  slurmctld || die "slurmctld failed to start (see $LOGD/slurmctld.log)"
  wait_for 60 "slurmctld (see $LOGD/slurmctld.log)" scontrol ping
}

start_slurmd() {
  if pid_alive "$RUN/slurmd-localhost.pid"; then return 0; fi
  mkdir -p "$SPOOL/slurmd-localhost"
  # The machine's hostname is not the node name: -N tells slurmd which node it is.
  slurmd -N localhost || die "slurmd failed to start (see $LOGD/slurmd-localhost.log)"
}

node_ready() {
  local state
  state="$(sinfo -h -N -n localhost -o '%T' 2>/dev/null)"
  [[ "$state" == idle* || "$state" == mixed* || "$state" == allocated* ]]
}

cmd_up() {
  install_packages
  mkdir -p "$ETC" "$RUN" "$LOGD" "$STATE" "$SPOOL"
  choose_ports
  start_munge
  start_mariadb
  setup_db_user
  write_configs
  start_slurmdbd
  start_slurmctld
  start_slurmd
  # A node left DOWN by an earlier unclean stop comes back here.
  if ! node_ready; then
    wait_for 30 "node localhost to register (see $LOGD/slurmd-localhost.log)" \
      bash -c "sinfo -h -N -n localhost -o '%T' | grep -qv '^$'"
    node_ready || scontrol update nodename=localhost state=resume >/dev/null 2>&1 || true
    wait_for 60 "node localhost to become idle (see $LOGD/slurmctld.log)" node_ready
  fi
  log "cluster $CLUSTER is up in $DIR"
  echo "export SLURM_CONF=$SLURM_CONF"
}

stop_pidfile() {  # stop_pidfile NAME PIDFILE : SIGTERM, wait, then SIGKILL
  local name="$1" f="$2" pid i
  pid_alive "$f" || { rm -f "$f"; return 0; }
  pid="$(tr -dc '0-9' < "$f")"
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 150; i++)); do
    proc_running "$pid" || break
    sleep 0.1
  done
  if proc_running "$pid"; then
    log "$name (pid $pid) ignored SIGTERM for 15 s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}

cmd_down() {
  if [[ ! -f "$SLURM_CONF" ]]; then log "no cluster in $DIR"; return 0; fi
  if pid_alive "$RUN/slurmctld.pid"; then
    # Cancel this cluster's jobs first so no job step outlives its slurmd.
    local jobs
    jobs="$(squeue -h -o '%A' 2>/dev/null || true)"
    if [[ -n "$jobs" ]]; then
      # shellcheck disable=SC2086
      scancel $jobs 2>/dev/null || true
      local i
      for ((i = 0; i < 100; i++)); do
        [[ -z "$(squeue -h -t R,CG -o '%A' 2>/dev/null)" ]] && break
        sleep 0.2
      done
    fi
  fi
  stop_pidfile slurmd "$RUN/slurmd-localhost.pid"
  stop_pidfile slurmctld "$RUN/slurmctld.pid"
  stop_pidfile slurmdbd "$RUN/slurmdbd.pid"
  stop_pidfile mariadbd "$RUN/mariadbd.pid"
  stop_pidfile munged "$RUN/munged.pid"
  log "cluster $CLUSTER in $DIR is down"
}

cmd_status() {
  local rc=0 name f
  for name in munged mariadbd slurmdbd slurmctld slurmd-localhost; do
    f="$RUN/$name.pid"
    if pid_alive "$f"; then echo "$name: running (pid $(tr -dc '0-9' < "$f"))"
    else echo "$name: stopped"; rc=1; fi
  done
  if [[ -f "$SLURM_CONF" ]] && pid_alive "$RUN/slurmctld.pid"; then
    sinfo -N -o '%N %T %c %m' || rc=1
  fi
  echo "export SLURM_CONF=$SLURM_CONF"
  return "$rc"
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  env) echo "export SLURM_CONF=$SLURM_CONF" ;;
  *) echo "usage: $0 up|down|status|env" >&2; exit 2 ;;
esac
