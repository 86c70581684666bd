# Shared by the Slurm batch script and the Kubernetes pod command (launch/render.py joins them).
# It reads REQUEUE_EXIT_CODE from its caller.

# summary.json newer than this marker was written by this run, not by an earlier allocation or pod.
launch_started=$(mktemp)
trap 'rm -f "$launch_started"' EXIT

# run_to_exit COMMAND...: run COMMAND and wait until it has really exited, setting launch_rc.
# A SIGTERM to this shell is passed on (in a pod, bash is PID 1 and the only process the kubelet
# signals; under Slurm the steps get it too, and a second TERM is harmless): the trainers then
# save a checkpoint, which the waiting must not cut short (a trapped signal interrupts `wait`).
run_to_exit() {
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

# preempted RUN_DIR: did the trainers save a checkpoint after a preemption signal and ask to be
# requeued? The launcher's exit code alone cannot tell: torchrun reports any worker's exit as 1, and
# srun may report the signal that ended a task. Rank 0 writes summary.json ("status": "preempted")
# after the checkpoint is committed and before any rank exits, so it is the record to trust.
preempted() {
  local summary="$1/summary.json"
  [ "$launch_rc" -eq "$REQUEUE_EXIT_CODE" ] ||
    { [ "$summary" -nt "$launch_started" ] && grep -q '"status": "preempted"' "$summary"; }
}
