# Device call B: NF-ResNet-50 224x224 at B=64 and B=128, AugMult K=16 on WRN-16-4, NF-ResNet-50 bf16.
cd "$(dirname "$0")" && source ./setup.sh || exit 1
date -u
timeout 140 python3 -m experiments.benchmark --model=nf_resnet50 --batch_size=64 --steps=30 --modes=nonprivate,ghost --output_json=$OUT/nf_resnet50_224_64.json
date -u
timeout 170 python3 -m experiments.benchmark --model=nf_resnet50 --batch_size=128 --steps=20 --modes=nonprivate,ghost --output_json=$OUT/nf_resnet50_224_128.json || \
  timeout 120 python3 -m experiments.benchmark --model=nf_resnet50 --batch_size=128 --physical_batch_size=64 --steps=20 --modes=ghost --output_json=$OUT/nf_resnet50_224_128_pbs64.json
date -u
timeout 110 python3 -m experiments.benchmark --model=wrn16_4 --batch_size=256 --augmult=16 --steps=10 --modes=nonprivate,vectorized --output_json=$OUT/wrn16_4_augmult16_256.json
date -u
timeout 150 python3 -m experiments.benchmark --model=nf_resnet50 --batch_size=128 --steps=20 --mixed_precision --modes=nonprivate,ghost --output_json=$OUT/nf_resnet50_224_128_bf16.json
date -u
