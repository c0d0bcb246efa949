# Device call A: peers at B=1024 (also the WRN-16-4 fp32 np/vectorized/ghost rows), WRN bf16, ViT.
cd "$(dirname "$0")" && source ./setup.sh || exit 1
date -u
timeout 330 python3 -m experiments.benchmark_peers --batch_size=1024 --steps=40 --warmup=2 --output_json=$OUT/peers.json
date -u
timeout 110 python3 -m experiments.benchmark --model=wrn16_4 --batch_size=1024 --steps=40 --mixed_precision --modes=nonprivate,ghost --output_json=$OUT/wrn16_4_bf16_1024.json
date -u
timeout 130 python3 -m experiments.benchmark --model=vit --batch_size=256 --steps=50 --output_json=$OUT/vit_256.json
date -u
