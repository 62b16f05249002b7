#!/usr/bin/env bash
# Two loopback "nodes" for the multi-node tests: a throwaway sshd listening on 127.0.0.1 and 127.0.0.2.
#
# usage: scripts/ssh_testbed.sh start DIR     (then: export BERT_SSH_TESTBED=DIR; bash scripts/test.sh)
#        scripts/ssh_testbed.sh stop DIR
#
# Everything lives in DIR: host and client keys, authorized_keys, sshd_config, an ssh_config and a
# DIR/bin/ssh wrapper that uses it (put DIR/bin first in PATH, as the tests do, and pdsh and DeepSpeed's
# launcher reach both "nodes" as they would reach a cluster's). Nothing outside DIR is read or changed: not
# ~/.ssh, not the system's sshd. `start` installs openssh-server and pdsh with apt-get only when they are
# missing and it runs as root (CI); elsewhere it says what to install.
set -euo pipefail

cmd=${1:-}
dir=${2:-}
if [[ -z $cmd || -z $dir || ($cmd != start && $cmd != stop) ]]; then
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)

if [[ $cmd == stop ]]; then
    [[ -f $dir/sshd.pid ]] && kill "$(cat "$dir/sshd.pid")" 2>/dev/null || true
    rm -f "$dir/sshd.pid"
    exit 0
fi

missing=()
command -v pdsh >/dev/null || missing+=(pdsh)
[[ -x /usr/sbin/sshd ]] || missing+=(openssh-server)
command -v ssh >/dev/null || missing+=(openssh-client)
if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
        echo "error: the multi-node testbed needs ${missing[*]}; install them (Debian: apt-get install ${missing[*]})" >&2
        exit 2
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q "${missing[@]}" >/dev/null; }
fi

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
[[ -f $dir/host_key ]] || ssh-keygen -q -t ed25519 -N '' -f "$dir/host_key"
[[ -f $dir/client_key ]] || ssh-keygen -q -t ed25519 -N '' -f "$dir/client_key"
cp "$dir/client_key.pub" "$dir/authorized_keys"
chmod 600 "$dir/authorized_keys" "$dir/host_key" "$dir/client_key"
cat >"$dir/sshd_config" <<EOF
ListenAddress 127.0.0.1:$port
ListenAddress 127.0.0.2:$port
HostKey $dir/host_key
AuthorizedKeysFile $dir/authorized_keys
PidFile $dir/sshd.pid
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UsePAM no
StrictModes no
MaxStartups 100:30:200
MaxSessions 100
EOF
cat >"$dir/ssh_config" <<EOF
Host 127.0.0.1 127.0.0.2
    Port $port
    IdentityFile $dir/client_key
    IdentitiesOnly yes
    StrictHostKeyChecking no
    UserKnownHostsFile /dev/null
    BatchMode yes
    LogLevel ERROR
EOF
mkdir -p "$dir/bin"
printf '#!/bin/sh\nexec %s -F %s "$@"\n' "$(command -v ssh)" "$dir/ssh_config" >"$dir/bin/ssh"
chmod +x "$dir/bin/ssh"
echo "$port" >"$dir/port"

bash "$0" stop "$dir"
mkdir -p /run/sshd 2>/dev/null || true # privilege separation directory (root runs only)
/usr/sbin/sshd -f "$dir/sshd_config" -E "$dir/sshd.log"
for host in 127.0.0.1 127.0.0.2; do
    for _ in $(seq 50); do
        "$dir/bin/ssh" "$host" true 2>/dev/null && continue 2
        sleep 0.1
    done
    echo "error: sshd in $dir does not answer on $host:$port (see $dir/sshd.log)" >&2
    exit 1
done
echo "ssh testbed ready: 127.0.0.1 and 127.0.0.2 port $port; export BERT_SSH_TESTBED=$dir"
