#!/bin/bash
# UNIMO-base on a TPU VM pod slice (v4-32: 4 hosts): every worker runs the same command and
# jax.distributed.initialize() finds the others (GCE metadata). Run from your workstation.
set -e
NAME=unimo ZONE=us-central2-b
gcloud compute tpus tpu-vm create $NAME --zone=$ZONE --accelerator-type=v4-32 \
    --version=tpu-ubuntu2204-base
gcloud compute tpus tpu-vm ssh $NAME --zone=$ZONE --worker=all --command="
  git clone https://github.com/OWNER/unimo_jax && cd unimo_jax &&
  pip install -e . 'jax[tpu]==0.10.2' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"
# What each worker would do (process index, coordinator, mesh, per-process batch):
gcloud compute tpus tpu-vm ssh $NAME --zone=$ZONE --worker=all --command="
  cd unimo_jax && unimo-jax train --config experiments/configs/base.py:/mnt/unimo_data \
      --workdir gs://BUCKET/unimo-base --print_env"
gcloud compute tpus tpu-vm ssh $NAME --zone=$ZONE --worker=all --command="
  cd unimo_jax && nohup unimo-jax train --config experiments/configs/base.py:/mnt/unimo_data \
      --workdir gs://BUCKET/unimo-base > train.log 2>&1 &"
