#!/usr/bin/env bash
# Copies a host binary into a VM root tree with the libraries ldd lists.
#
#   bash tools/vm/add-binary.sh BINARY ROOT DEST
#
# DEST is the path inside ROOT (e.g. /usr/local/sbin/replctl).
set -euo pipefail
src=$1 root=$2 dst=$3
install -D -m 0755 "$src" "$root$dst"
# mawk has no \s; the loader line has no "=>".
for lib in $(ldd "$src" | awk '/=>/ {print $3} !/=>/ && $1 ~ /^\// {print $1}' | grep '^/'); do
    [[ -e $root$lib ]] || install -D -m 0755 "$(readlink -f "$lib")" "$root$lib"
done
