#!/bin/bash
# The whole pipeline on a SLURM cluster, each stage waiting for the previous one:
# patch (array) -> extract (GPUs) -> train (folds as an array) -> evaluate.
#
#   bash examples/slurm/pipeline.sh cohort.csv work/ runs/exp1 examples/experiment.yaml
#
set -euo pipefail
cohort=${1:?usage: pipeline.sh COHORT_CSV WORK_DIR RUN_DIR [CONFIG]}
work=${2:?usage: pipeline.sh COHORT_CSV WORK_DIR RUN_DIR [CONFIG]}
run=${3:?usage: pipeline.sh COHORT_CSV WORK_DIR RUN_DIR [CONFIG]}
config=${4:-examples/experiment.yaml}
here=$(dirname "$0")
mkdir -p logs

patch=$(sbatch --parsable "$here/patch_array.sbatch" "$cohort" "$work")
extract=$(sbatch --parsable --dependency=afterok:"$patch" "$here/extract_gpus.sbatch" "$work")
train=$(sbatch --parsable --dependency=afterok:"$extract" \
    "$here/train_folds_array.sbatch" "$work" "$run" "$config")
sbatch --dependency=afterok:"$train" --job-name=slidemil-evaluate --time=00:30:00 \
    --output=logs/%x_%j.out --wrap "slidemil evaluate '$run' --quiet"
echo "submitted: patch $patch, extract $extract, train $train; outputs in $run/report/"
