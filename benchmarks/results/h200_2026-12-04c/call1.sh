source benchmarks/results/h200_2026-12-02b/prelude.sh
python -c "import torch, torch.utils.checkpoint as c; print('torch', torch.__version__, 'SAC_IGNORED_OPS', hasattr(c, 'SAC_IGNORED_OPS'))" | tee -a $LOG
step cpu_selective 240 python -m pytest -q -p no:warnings tests/parallel/test_selective_checkpoint.py tests/parallel/test_expert_parallel.py "tests/parallel/test_model_parallel_layouts.py::test_cp2_matches_one_process" tests/trainer/test_resume_settings.py --junitxml=$OUT/cpu_selective.xml
step gpu_tests 330 python -m pytest -n 8 -q -p no:warnings tests/gpu --junitxml=$OUT/gpu_tests.xml
grep -E "^==|passed|failed|SAC" $LOG | tail -n 20
