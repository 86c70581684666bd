# sourced first by every device call
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR=$PWD/.kcache/triton TORCHINDUCTOR_CACHE_DIR=$PWD/.kcache/inductor
[ -f .kcache.tgz ] && tar xzf .kcache.tgz
[ -f devrun/autotune.tgz ] && tar xzf devrun/autotune.tgz
LOG=$OUT/log.txt
step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2; shift 2; local t0=$SECONDS
    echo "===== $name: $*" >> $LOG
    timeout "$limit" "$@" >> $LOG 2>&1
    echo "== $name: exit $? in $((SECONDS - t0)) s" | tee -a $LOG
}
savecache() { tar czf $OUT/kcache.tgz .kcache 2>/dev/null; du -sh .kcache $OUT/kcache.tgz; }
saveautotune() { find .kcache -name "*.autotune.json" | tar czf $OUT/autotune.tgz -T - 2>/dev/null; du -sh $OUT/autotune.tgz; }
