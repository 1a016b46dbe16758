#!/usr/bin/env bash
# Runs .ci/run on a newer Python than CI's: Debian trixie's Python 3.13, in
# a chroot, on a fresh clone of this checkout's HEAD (with ../shared beside
# it). There pip resolves the newest JAX (0.12 on 2026-12-05), where Python
# 3.11 stops at JAX 0.10. Needs root, debootstrap and the network (Debian's
# archive, PyPI). The chroot stays in ROOT for the next run.
#
#   bash tools/newer-python.sh [JAX_VERSION] [ROOT]   # ROOT: /opt/trixie
#
# With JAX_VERSION (0.11.2, say) both environments are constrained to that
# jax and jaxlib.
set -euo pipefail
cd "$(dirname "$0")/.."
jax_version=${1:-}
root=${2:-/opt/trixie}
if [ ! -x "$root/usr/bin/python3" ]; then
    debootstrap --variant=minbase \
        --include=python3,python3-venv,python3-pip,ca-certificates,git \
        trixie "$root" http://deb.debian.org/debian
fi
cp /etc/resolv.conf "$root/etc/resolv.conf"
# This machine's certificate authorities (a proxy's, where there is one).
cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/"
if mountpoint -q "$root/ci/shared"; then  # left by an interrupted run
    umount "$root/ci/shared"
fi
rm -rf "$root/ci" && mkdir -p "$root/ci/shared"
git clone --quiet . "$root/ci/main"
mounted=()
cleanup() {
    for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do
        umount "${mounted[i]}"
    done
}
trap cleanup EXIT
for target in proc dev dev/shm ci/shared; do
    case $target in
        proc) mount -t proc proc "$root/proc" ;;
        ci/shared) mount --bind ../shared "$root/ci/shared"
                   mount -o remount,bind,ro "$root/ci/shared" ;;
        *) mount --bind "/$target" "$root/$target" ;;
    esac
    mounted+=("$root/$target")
done
constraint=
if [ -n "$jax_version" ]; then
    printf 'jax==%s\njaxlib==%s\n' "$jax_version" "$jax_version" \
        > "$root/ci/constraints.txt"
    constraint=/ci/constraints.txt
fi
# Debian's Python is externally managed; the chroot is ours to install into.
chroot "$root" env -i PATH=/usr/local/bin:/usr/bin:/bin HOME=/root \
    LANG=C.UTF-8 PIP_BREAK_SYSTEM_PACKAGES=1 \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    ${constraint:+PIP_CONSTRAINT=$constraint} \
    bash -c 'cd /ci/main && python3 --version && bash .ci/run &&
             .venv-jax/bin/python -c "import jax; print(\"jax\", jax.__version__)"'
