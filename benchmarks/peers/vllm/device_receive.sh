#!/usr/bin/env bash
# On the device: copy one carried part (.vllm_whl/pK) to /root/vllm_parts, which outlives the call while the
# machine stays warm, and say which parts are there so far.   usage: device_receive.sh pK
set -euo pipefail
part=${1:?usage: device_receive.sh pK}
src=.vllm_whl/$part
dst=${VLLM_PARTS:-/root/vllm_parts}
[[ -f $src/MANIFEST_$part ]] || { echo "device_receive: no $src/MANIFEST_$part here: carry .vllm_whl/$part" >&2; exit 2; }
python3 -c 'import lzma' || { echo "device_receive: this python3 has no lzma: the LZMA-packed wheels cannot install; re-fetch with fetch.py --no-lzma" >&2; exit 3; }
mkdir -p "$dst"
cp -f "$src"/* "$dst"/
total=$(cat "$dst/PARTS_TOTAL")
have=(); missing=()
for ((k = 1; k <= total; k++)); do
  if [[ -f $dst/MANIFEST_p$k ]] && (cd "$dst" && xargs -a "MANIFEST_p$k" ls >/dev/null 2>&1); then have+=("p$k"); else missing+=("p$k"); fi
done
echo "device_receive: $part copied ($(du -sh "$src" | cut -f1)); parts present in $dst: ${have[*]:-none}; missing: ${missing[*]:-none}"
