# Shared by the Slurm batch script and the Kubernetes pod command (launch/render.py joins them).
# It reads RUN_DIR and REQUEUE_EXIT_CODE from its caller.

# run_to_exit COMMAND...: run COMMAND and wait until it has really exited, setting launch_rc.
# A SIGTERM to this shell is passed on (in a pod, bash is PID 1 and the only process the kubelet
# signals; under Slurm the steps get it too, and a second TERM is harmless): the trainers then
# save a checkpoint, which the waiting must not cut short (a trapped signal interrupts `wait`).
# First it stamps a marker in RUN_DIR (one per node, rewritten by each start, so a killed
# shell leaves no more): a summary.json not older than it was written by this run, not by an
# earlier allocation or pod (compared on the run's own filesystem; a stale summary is older by the
# requeue's minutes, so a timestamp tick in common means this run).
run_to_exit() {
  launch_started="$RUN_DIR/.launch-started.$(hostname)"
  mkdir -p "$RUN_DIR" && touch "$launch_started" ||
    { echo "launch: cannot write to the run directory $RUN_DIR"; exit 1; }
  trap 'rm -f "$launch_started"' EXIT
  "$@" &
  launch_pid=$!
  trap 'echo "launch: SIGTERM, passed on; waiting for the trainers to checkpoint"
        kill -TERM "$launch_pid" 2>/dev/null' TERM
  while :; do
    wait "$launch_pid"
    launch_rc=$?
    kill -0 "$launch_pid" 2>/dev/null || break
  done
  trap - TERM
}

# run_exit_code: the exit code the trainers asked for. The launcher's alone cannot tell: torchrun
# reports any worker's exit as 1, and srun may report the signal that ended a task. Rank 0 writes
# summary.json with its "exit_code" (75: preempted, checkpoint saved, before any rank exits; 3:
# stopped by a guard; 2: bad configuration) so a summary written during this run is the record
# to trust; without one (a crash before it), the launcher's code.
run_exit_code() {
  local summary="$RUN_DIR/summary.json" code=""
  if [ "$launch_rc" -ne 0 ] && [ -e "$summary" ] && ! [ "$launch_started" -nt "$summary" ]; then
    code=$(sed -n 's/^ *"exit_code": \([0-9][0-9]*\),\{0,1\}$/\1/p' "$summary" | head -n 1)
  fi
  echo "${code:-$launch_rc}"
}
