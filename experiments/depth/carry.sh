# Sourced by the device scripts that start from the depth backbone carried in .carry/ (gpu_alpha.sh,
# gpu_plateau.sh): sets the environment, unpacks the backbone into $O and sets D, the generated task's folder.
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
mkdir -p $O && tar xzf .carry/ck_backbone.tgz -C $O
D=$(python -c "
from pathlib import Path; from kava.config import load_config; from kava.data.pipeline import synthetic_dir
print(synthetic_dir(load_config('synth_depth_student'), Path('$O/_data')))")
