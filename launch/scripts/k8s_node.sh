# The command of every pod of the Indexed Job (after preemption.sh); the trainer arguments are
# its positional arguments and everything else comes from the container's environment.
set -uo pipefail

# Pod 0 hosts torchrun's c10d rendezvous; it is reachable as JOB_NAME-0.JOB_NAME through the
# headless Service. The pod's exit code is what the Job's podFailurePolicy acts on: the trainers'
# own (run_exit_code), not torchrun's 1.
is_host=0
[ "$JOB_COMPLETION_INDEX" = 0 ] && is_host=1
echo "launch: pod $JOB_COMPLETION_INDEX of $NNODES, $NPROC_PER_NODE rank(s); rendezvous $MASTER_ADDR:$MASTER_PORT"
run_to_exit "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --nproc-per-node="$NPROC_PER_NODE" \
  --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$JOB_NAME" \
  --rdzv-conf="is_host=$is_host" pretrain/main.py --run-dir "$RUN_DIR" "$@"

rc=$(run_exit_code)
if [ "$rc" -eq "$REQUEUE_EXIT_CODE" ]; then
  echo "launch: preempted; exit $REQUEUE_EXIT_CODE so that the Job recreates the pod, which resumes"
else
  echo "launch: trainers exited $rc"
fi
exit "$rc"
