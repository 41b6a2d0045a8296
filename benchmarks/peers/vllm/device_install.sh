#!/usr/bin/env bash
# On the device, after every part was received: join the cut wheels, check every wheel's sha256, install them
# into $VLLM_SITE (default /tmp/vllm_site; the image's torch stays), then smoke-import vLLM's offline path.
set -euo pipefail
parts=${VLLM_PARTS:-/root/vllm_parts}
site=${VLLM_SITE:-/tmp/vllm_site}
repo=$(pwd)
[[ -f $parts/PARTS_TOTAL ]] || { echo "device_install: nothing received in $parts (machine went cold?): resend every part" >&2; exit 2; }
total=$(cat "$parts/PARTS_TOTAL")
missing=()
for ((k = 1; k <= total; k++)); do [[ -f $parts/MANIFEST_p$k ]] || missing+=("p$k"); done
if ((${#missing[@]})); then echo "device_install: missing parts ${missing[*]} of $total: resend them (device_receive.sh)" >&2; exit 2; fi
cd "$parts"
shopt -s nullglob
for first in *.piece00; do
  whole=${first%.piece00}
  cat "$whole".piece[0-9][0-9] > "$whole.joining" && mv "$whole.joining" "$whole"
done
sha256sum --quiet -c SHA256SUMS || { echo "device_install: a wheel's sha256 is wrong (see above)" >&2; exit 3; }
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" $(cut -d' ' -f3 SHA256SUMS)
echo "device_install: $(wc -l < SHA256SUMS) wheels installed into $site in $(( $(date +%s) - t0 )) s ($(du -sh "$site" | cut -f1))"
cd "$repo"
[[ ${VLLM_SKIP_AUDIT:-0} == 1 ]] && exit 0  # tests: no vLLM to import
PYTHONPATH=$site python3 benchmarks/peers/vllm/import_audit.py --site "$site" --json "${OUT:-/tmp}/vllm_import_audit.json" > /tmp/vllm_import_audit.log 2>&1 \
  || { grep -A80 "^import audit" /tmp/vllm_import_audit.log; exit 4; }
tail -1 /tmp/vllm_import_audit.log
