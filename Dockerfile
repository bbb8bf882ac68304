# megatron-latent on NVIDIA's NGC PyTorch container, which already holds CUDA, NCCL, torch,
# transformer-engine and apex: the project installs around them and keeps their versions.
#
#   docker build -t megatron-latent .
#   docker run --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 \
#     -v /data:/data -v /ckpt:/ckpt \
#     -e DATA_PATH=/data/pile_text_document -e TOKENIZER_MODEL=/data/20B_tokenizer.json \
#     -e CHECKPOINT_PATH=/ckpt/pondering-1b \
#     megatron-latent bash examples/pretrain_pondering_pythia_1b.sh
# megatron-core 0.16.1 needs transformer-engine >=2.9,<2.12 (the `te` extra in setup.py); the
# build stops with a message if the base image ships another one.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.12-py3
FROM ${BASE_IMAGE}

WORKDIR /workspace/megatron-latent
COPY setup.py pyproject.toml README.md ./
COPY megatron_latent ./megatron_latent
# Pin what the image ships so pip cannot replace it with registry builds.
RUN pip freeze | grep -iE '^(torch|transformer[-_]engine|apex|flash[-_]attn|triton)==' \
        > /tmp/ngc-pins.txt || true \
 && pip install --no-cache-dir -c /tmp/ngc-pins.txt -e ".[wandb,eval]" \
 && python -c "import megatron.core, megatron_latent, transformer_engine; print('ok')" \
 && python -c "from importlib.metadata import version; \
from packaging.specifiers import SpecifierSet; te = version('transformer_engine'); \
assert te in SpecifierSet('>=2.9,<2.12', prereleases=True), \
f'transformer-engine {te} in this BASE_IMAGE; megatron-core 0.16.1 needs >=2.9,<2.12'"
COPY . .

ENV CUDA_DEVICE_MAX_CONNECTIONS=1 \
    PYTHONUNBUFFERED=1
CMD ["bash", "-c", "python pretrain.py --help"]
