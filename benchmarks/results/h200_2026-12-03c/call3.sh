source devrun/prelude.sh
step inference 200 python benchmarks/inference.py --archs llama,swa,mamba2,inter_hybrid,intra_hybrid --variants compiled --profile --out $OUT/inference
step gpu_tests 330 python -m pytest -n 8 -q -p no:warnings -rfEs tests/gpu --junitxml=$OUT/gpu_tests.xml
grep -v "Warning\|warn\|^$\|This call\|File \|cos, sin\|torch._dynamo" $LOG | grep -v "^    op " | grep -E "^(=====|==|\[|llama|swa|mamba2|inter|intra|transformers|[0-9]+ passed|FAILED|ERROR|SKIPPED|E )" | tail -n 80
python - <<'PY'
import xml.etree.ElementTree as ET, os
s = ET.parse(os.environ["OUT"] + "/gpu_tests.xml").getroot().find("testsuite")
print({k: s.get(k) for k in ("tests", "failures", "errors", "skipped", "time")})
PY
