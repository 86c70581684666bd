source devrun/prelude.sh
step trainer_test 200 python -m pytest -q -p no:warnings -rfEs tests/gpu/test_trainer_cuda.py --junitxml=$OUT/gpu_trainer_test.xml
for i in 1 2; do step intra_$i 60 python benchmarks/inference.py --archs intra_hybrid --lengths 2048 --variants compiled --no-hf --out $OUT/intra_$i; done
grep -E "^(=====|==|\[|intra|[0-9]+ passed|FAILED|ERROR|E )" $LOG | tail -n 30
python - <<'PY'
import xml.etree.ElementTree as ET, os
s = ET.parse(os.environ["OUT"] + "/gpu_trainer_test.xml").getroot().find("testsuite")
print({k: s.get(k) for k in ("tests", "failures", "errors", "skipped", "time")})
PY
