source devrun/prelude.sh; step trainer 130 python -m pytest -q -p no:cacheprovider -W ignore tests/gpu/test_trainer_cuda.py -rfE --durations=3
