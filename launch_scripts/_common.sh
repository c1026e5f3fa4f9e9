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

# run_launcher CMD...: run a launcher (torchrun, deepspeed) and hand the stop signals this script gets
# (TERM, USR1, USR2, INT, HUP) to its training processes (its descendants with RANK set) instead of to
# the launcher. With --exit-signal-handler each finishes its step, saves and exits 0, and the launcher
# and this script exit 0 with them (torchrun itself exits 1 after it forwards a signal). Returns the
# launcher's exit status.
_descendants() {
    local child
    for child in $(pgrep -P "$1" 2>/dev/null); do
        echo "$child"
        _descendants "$child"
    done
}
_signal_workers() {  # SIGNAL LAUNCHER_PID; to the launcher itself when no worker runs here (pdsh to other nodes)
    local pid found=0
    for pid in $(_descendants "$2"); do
        if tr '\0' '\n' < "/proc/$pid/environ" 2>/dev/null | grep -q '^RANK='; then
            kill -s "$1" "$pid" 2>/dev/null || true
            found=1
        fi
    done
    if (( ! found )); then kill -s "$1" "$2" 2>/dev/null || true; fi
}
run_launcher() {
    "$@" &
    local launcher=$! rc=0 sig
    for sig in TERM USR1 USR2 INT HUP; do
        # shellcheck disable=SC2064  # expand now: the signal and the pid
        trap "_signal_workers $sig $launcher" "$sig"
    done
    while true; do
        wait "$launcher" && rc=0 || rc=$?
        kill -0 "$launcher" 2>/dev/null || break  # else a trapped signal interrupted wait: keep waiting
    done
    return "$rc"
}
