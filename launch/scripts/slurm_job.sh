# The batch script's body (after the #SBATCH lines, the renderer's values and preemption.sh).
set -uo pipefail
cd "$WORKDIR" || exit 1

# One torchrun per node, each starting NPROC_PER_NODE trainers; they meet at the c10d rendezvous
# on the allocation's first node. A job requeued or resubmitted on another number of nodes
# (sbatch --nodes=N) resumes: the trainers reshard the newest checkpoint.
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
echo "launch: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NUM_NODES node(s)" \
  "x $NPROC_PER_NODE rank(s); rendezvous $MASTER_ADDR:$MASTER_PORT"
# srun steps do not inherit --cpus-per-task from the batch script (Slurm 22.05+): pass it on.
run_to_exit srun --ntasks-per-node=1 --cpus-per-task="$SLURM_CPUS_PER_TASK" --kill-on-bad-exit=1 \
  "$PYTHON" -m torch.distributed.run --nnodes="$SLURM_JOB_NUM_NODES" --nproc-per-node="$NPROC_PER_NODE" \
  --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$SLURM_JOB_ID" \
  pretrain/main.py --run-dir "$RUN_DIR" "${TRAIN_ARGS[@]}"

rc=$(run_exit_code)
if [ "$rc" -eq "$REQUEUE_EXIT_CODE" ]; then
  echo "launch: preempted; requeueing job $SLURM_JOB_ID, it resumes from the newest complete checkpoint"
  scontrol requeue "$SLURM_JOB_ID" && exit 0
  echo "launch: scontrol requeue failed; the checkpoint is saved: sbatch this script again to resume"
fi
echo "launch: trainers exited $rc"
exit "$rc"
