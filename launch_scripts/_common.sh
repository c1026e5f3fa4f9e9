# Sourced by the launch scripts: repository root on PYTHONPATH (the package need not be installed),
# the interpreter, and the default config. Not a launcher itself.
MOC_ROOT="${MOC_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
export PYTHONPATH="$MOC_ROOT${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python}"
# CONFIG=file: passed as the first --config; CONFIG= (empty): none; unset: moc-tiny unless the flags
# given to the script already name a --config.
CONFIG_ARGS=()
if [[ -n "${CONFIG-}" ]]; then
    CONFIG_ARGS=(--config "$CONFIG")
elif [[ -z "${CONFIG+set}" && " $* " != *" --config "* ]]; then
    CONFIG_ARGS=(--config "$MOC_ROOT/configs/train/moc-tiny.yaml")
fi
gpus_or() {  # GPUs on this node, else $1 (CPU processes)
    local n
    n=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
    if [[ "$n" -gt 0 ]]; then echo "$n"; else echo "$1"; fi
}
# --tensor-model-parallel-size > 1: one CUDA hardware queue, so that megatron-core's tensor-parallel
# communication runs in the order it was issued. Read when CUDA starts; the trainer sets it too, in
# time, when the size comes from a config file.
_tp=1
_prev=
for _arg in "$@"; do
    if [[ "$_arg" == --tensor-model-parallel-size=* ]]; then _tp="${_arg#*=}"; fi
    if [[ "$_prev" == "--tensor-model-parallel-size" ]]; then _tp="$_arg"; fi
    _prev="$_arg"
done
if [[ "$_tp" =~ ^[0-9]+$ ]] && (( _tp > 1 )); then
    export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
fi
unset _tp _prev _arg
