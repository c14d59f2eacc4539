#!/usr/bin/env bash
# Two ssh-reachable "hosts" on this one machine, for the DeepSpeed pdsh and OpenMPI launcher
# tests (tests/launch/test_real_launchers.py): node0 = 127.0.0.1, node1 = 127.0.0.2 (both
# loopback, both this machine), an sshd listening on those two addresses only, root key login
# without prompts, pdsh and OpenMPI. Idempotent: installs openssh-server/openssh-client/pdsh/
# openmpi-bin if missing, adds the
# /etc/hosts aliases, creates host keys and a root key (authorized for itself), writes
# /etc/ssh/sshd_config.cratelm-local and a marked block in /root/.ssh/config, starts sshd
# (plain daemon, no systemd here; pid file /run/sshd-cratelm-local.pid) if it is not
# running, restarts the one it started when its configuration changed.
# Must run as root. Exit 0 when `pdsh -R ssh -w node0,node1 hostname` prints both hosts.
#
# Hosts: SSH_LOCAL_HOSTS="node0=127.0.0.1 node1=127.0.0.2" (default); every address must be
# 127.0.0.x. /etc/hosts lines for these names are (re)written; other lines are left alone.
# `tests/launch/ssh_local.sh stop` stops the sshd it started (the rest stays: it is idempotent).
set -u
log() { echo "ssh-local: $*" >&2; }
if [ "${1:-}" = stop ]; then
  pidf=/run/sshd-cratelm-local.pid
  pid=$(cat "$pidf" 2>/dev/null)
  [ -n "$pid" ] && kill "$pid" 2>/dev/null && log "stopped sshd $pid"
  rm -f "$pidf"; exit 0
fi
[ "$(id -u)" = 0 ] || { log "must run as root"; exit 1; }
export DEBIAN_FRONTEND=noninteractive
HOSTS=${SSH_LOCAL_HOSTS:-"node0=127.0.0.1 node1=127.0.0.2"}
CONF=/etc/ssh/sshd_config.cratelm-local
PIDF=/run/sshd-cratelm-local.pid
names=""; addrs=""
for hp in $HOSTS; do
  n=${hp%%=*}; a=${hp#*=}
  case "$a" in 127.0.0.[0-9]*) ;; *) log "$n=$a: only 127.0.0.x addresses (loopback) are allowed"; exit 1;; esac
  names="$names $n"; addrs="$addrs $a"
done
names=${names# }
addrs=$(printf '%s\n' $addrs | sort -u | tr '\n' ' ')

# ---- 1. packages
. "$(dirname "${BASH_SOURCE[0]}")/apt_install.sh"
apt_install /tmp/ssh-local-apt.log openssh-server openssh-client pdsh openmpi-bin

# ---- 2. /etc/hosts: NAME -> 127.0.0.x (a name's old line is replaced)
for hp in $HOSTS; do
  n=${hp%%=*}; a=${hp#*=}
  if [ "$(getent hosts "$n" | awk '{print $1; exit}')" != "$a" ] || ! grep -qE "^$a[[:space:]]+$n\$" /etc/hosts; then
    log "/etc/hosts: $a $n"
    # /etc/hosts may be a bind mount: rewrite in place (no rename)
    tmp=$(mktemp); grep -vE "^[0-9.:a-fA-F]+[[:space:]]+$n\$" /etc/hosts > "$tmp"; echo "$a $n" >> "$tmp"
    cat "$tmp" > /etc/hosts; rm -f "$tmp"
  fi
done

# ---- 3. keys: host keys, root's key, authorized for root
ssh-keygen -A >/dev/null 2>&1
install -d -m 0700 /root/.ssh
[ -s /root/.ssh/id_ed25519 ] || { log "creating /root/.ssh/id_ed25519"; ssh-keygen -q -t ed25519 -N '' -f /root/.ssh/id_ed25519 -C cratelm-local; }
pub=$(cat /root/.ssh/id_ed25519.pub)
touch /root/.ssh/authorized_keys; chmod 0600 /root/.ssh/authorized_keys
grep -qxF "$pub" /root/.ssh/authorized_keys || echo "$pub" >> /root/.ssh/authorized_keys

# ---- 4. client side: no prompts, no known_hosts churn for these aliases (marked block)
block=$(cat <<EOF
# >>> cratelm ssh-local (tests/launch/ssh_local.sh)
Host $names
    User root
    IdentityFile /root/.ssh/id_ed25519
    StrictHostKeyChecking no
    UserKnownHostsFile /dev/null
    LogLevel ERROR
    BatchMode yes
    ConnectTimeout 5
# <<< cratelm ssh-local
EOF
)
cfg=/root/.ssh/config; touch "$cfg"; chmod 0600 "$cfg"
cur=$(sed -n '/^# >>> cratelm ssh-local/,/^# <<< cratelm ssh-local/p' "$cfg")
if [ "$cur" != "$block" ]; then
  log "writing the cratelm block of $cfg"
  tmp=$(mktemp); sed '/^# >>> cratelm ssh-local/,/^# <<< cratelm ssh-local/d' "$cfg" > "$tmp"
  { printf '%s\n' "$block"; cat "$tmp"; } > "$cfg"; rm -f "$tmp"   # first: ssh takes the first value it sees
fi

# ---- 5. sshd: loopback addresses only, keys only
new=$(mktemp)
{
  echo "# written by tests/launch/ssh_local.sh: sshd on loopback only, root by key"
  echo "Port 22"
  for a in $addrs; do echo "ListenAddress $a"; done
  cat <<EOF
HostKey /etc/ssh/ssh_host_ed25519_key
HostKey /etc/ssh/ssh_host_rsa_key
PidFile $PIDF
PermitRootLogin prohibit-password
PubkeyAuthentication yes
AuthorizedKeysFile .ssh/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PrintMotd no
AcceptEnv LANG LC_*
Subsystem sftp /usr/lib/openssh/sftp-server
MaxStartups 100:30:200
MaxSessions 100
EOF
} > "$new"
changed=0
if ! cmp -s "$new" "$CONF"; then log "writing $CONF"; cp "$new" "$CONF"; chmod 0644 "$CONF"; changed=1; fi
rm -f "$new"
install -d -m 0755 /run/sshd
alive() { [ -s "$PIDF" ] && kill -0 "$(cat "$PIDF")" 2>/dev/null; }
/usr/sbin/sshd -t -f "$CONF" || { log "sshd -t rejects $CONF"; exit 1; }
if [ "$changed" = 1 ] && alive; then
  pid=$(cat "$PIDF"); log "stopping sshd ($pid): configuration changed"; kill "$pid"
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
fi
if ! alive; then
  log "starting sshd -f $CONF (log: /var/log/sshd-cratelm-local.log)"
  /usr/sbin/sshd -f "$CONF" -E /var/log/sshd-cratelm-local.log || { tail -5 /var/log/sshd-cratelm-local.log; log "sshd failed to start"; exit 1; }
fi
for _ in $(seq 50); do alive && break; sleep 0.1; done
alive || { tail -5 /var/log/sshd-cratelm-local.log 2>/dev/null; log "sshd is not running"; exit 1; }

# ---- 6. checks: ssh to every alias (as DeepSpeed's runner does), then pdsh over them all
for n in $names; do
  out=$(timeout 20 ssh -o PasswordAuthentication=no "$n" hostname 2>&1) \
    || { echo "$out"; tail -5 /var/log/sshd-cratelm-local.log; log "ssh $n hostname failed"; exit 1; }
done
want=$(for n in $names; do echo "$n: $(hostname)"; done | sort)
got=$(timeout 30 pdsh -R ssh -w "$(echo "$names" | tr ' ' ',')" hostname 2>&1 | sort)
[ "$got" = "$want" ] || { echo "$got"; log "pdsh -R ssh -w ${names// /,} hostname did not print every host"; exit 1; }
log "ok: sshd $(cat "$PIDF") on$(for a in $addrs; do printf ' %s:22' "$a"; done), pdsh $(pdsh -V 2>&1 | head -n 1 | awk '{print $1}'), hosts: $(for hp in $HOSTS; do printf '%s ' "$hp"; done)"
