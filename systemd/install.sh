#!/bin/sh
# Install the edge agent as a systemd service. See systemd/README.md.
#
#   sudo systemd/install.sh [--prefix DIR] [--dry-run] [--python PYTHON] WHEEL_OR_SOURCE_DIR
#
# What it does (paths relative to --prefix, default /):
#   /opt/edge-agent/venv                 a venv with the package pip-installed from the argument
#   /usr/local/bin/edge-agent            a symlink to the venv's edge-agent entry point
#   /etc/systemd/system/edge-agent.service
#   /etc/edge-agent/agent.toml           from agent.toml.example, only if missing (never replaced)
#   /etc/edge-agent/credentials/         0700, root only: secrets for LoadCredential=
#   /etc/edge-agent/trusted-keys/        public keys (*.pub) that may sign model bundles
# then `systemctl daemon-reload` (only when --prefix is /). It does not enable or start the service.
#
# --dry-run prints every action and changes nothing. --prefix DIR stages the whole tree under DIR
# (for tests and inspection: the venv's scripts then name DIR/opt/edge-agent/venv, and systemd is
# not told). Re-running upgrades the package and the unit and keeps the config.
set -eu

usage() {
    echo "usage: $0 [--prefix DIR] [--dry-run] [--python PYTHON] WHEEL_OR_SOURCE_DIR" >&2
    exit 2
}

prefix=/
dry_run=0
python=python3
src=""
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) [ $# -ge 2 ] || usage; prefix=$2; shift 2 ;;
        --prefix=*) prefix=${1#--prefix=}; shift ;;
        --python) [ $# -ge 2 ] || usage; python=$2; shift 2 ;;
        --python=*) python=${1#--python=}; shift ;;
        --dry-run) dry_run=1; shift ;;
        -h | --help) usage ;;
        -*) echo "install.sh: unknown option $1" >&2; usage ;;
        *) [ -z "$src" ] || usage; src=$1; shift ;;
    esac
done
[ -n "$src" ] || usage

here=$(cd "$(dirname "$0")" && pwd)
case "$prefix" in
    /) root="" ;;
    /*) root=${prefix%/} ;;
    *) echo "install.sh: --prefix $prefix: must be an absolute path" >&2; exit 2 ;;
esac
if [ ! -f "$src" ] && [ ! -d "$src" ]; then
    echo "install.sh: $src: no such wheel or source directory" >&2
    exit 2
fi
if [ -d "$src" ]; then
    src=$(cd "$src" && pwd)
else
    src=$(cd "$(dirname "$src")" && pwd)/$(basename "$src")
fi
if [ "$dry_run" = 0 ] && [ -z "$root" ] && [ "$(id -u)" != 0 ]; then
    echo "install.sh: installing into / needs root (run it with sudo, or use --dry-run)" >&2
    exit 1
fi

venv=$root/opt/edge-agent/venv
bindir=$root/usr/local/bin
unitdir=$root/etc/systemd/system
confdir=$root/etc/edge-agent

# Print a command, then run it unless --dry-run.
run() {
    echo "+ $*"
    if [ "$dry_run" = 0 ]; then
        "$@"
    fi
}

run install -d -m 0755 "$root/opt/edge-agent"
if [ -x "$venv/bin/python" ]; then
    echo "# $venv exists: upgrading the package in it"
else
    run "$python" -m venv "$venv"
fi
run "$venv/bin/python" -m pip install --disable-pip-version-check --quiet --upgrade "$src"
if [ "$dry_run" = 0 ] && [ ! -x "$venv/bin/edge-agent" ]; then
    echo "install.sh: $src installed no edge-agent command into $venv/bin" >&2
    exit 1
fi
run install -d -m 0755 "$bindir"
run ln -sfn "$venv/bin/edge-agent" "$bindir/edge-agent"

run install -d -m 0755 "$unitdir"
run install -m 0644 "$here/edge-agent.service" "$unitdir/edge-agent.service"

# The service reads its config as an unprivileged dynamic user: agent.toml and the public keys
# are world-readable; secrets live only in credentials/, which systemd reads as root.
run install -d -m 0755 "$confdir"
if [ -e "$confdir/agent.toml" ]; then
    echo "# $confdir/agent.toml exists: kept as it is"
else
    run install -m 0644 "$here/agent.toml.example" "$confdir/agent.toml"
fi
run install -d -m 0700 "$confdir/credentials"
run install -d -m 0755 "$confdir/trusted-keys"

if [ -z "$root" ]; then
    run systemctl daemon-reload
else
    echo "# --prefix $prefix: not running systemctl daemon-reload"
fi

if [ "$dry_run" = 1 ]; then
    printf '\nDry run: nothing was changed. After a real install:\n'
else
    printf '\nInstalled. Next:\n'
fi
cat <<EOF
  1. edit $confdir/agent.toml; put bundle signing keys (*.pub) in $confdir/trusted-keys/
  2. put secrets in $confdir/credentials/ (mode 0600) and name them in a drop-in
     (systemctl edit edge-agent), e.g.
       [Service]
       LoadCredential=mqtt-password:/etc/edge-agent/credentials/mqtt-password
  3. systemctl enable --now edge-agent
     journalctl -u edge-agent -f
EOF
