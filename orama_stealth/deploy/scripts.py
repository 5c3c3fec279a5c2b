"""Shell scripts the steps run on the node, each one remote command so a step is all-or-nothing
as far as a shell allows and the :443 gap during the switch is one SSH round trip, not several."""

from __future__ import annotations

import shlex

from orama_stealth.deploy import handover, layout, source_routing

UNIT = layout.ROUTER_UNIT_NAME
SOCKETS = " ".join(layout.SOCKET_UNIT_NAMES)
ALL_UNITS = f"{SOCKETS} {UNIT}"


def backup(caddyfile: str) -> str:
    """Copy every file the cutover changes into a new timestamped directory, then point
    `pre-cutover` at it. Files that did not exist are listed in ABSENT so rollback removes them.
    Does nothing when the pointer exists: that backup holds the pre-cutover files."""
    lines = [
        "set -eu",
        f"B={layout.BACKUPS}",
        f'if [ -e {layout.BACKUP_POINTER} ]; then exit 0; fi',
        'ts=$(date -u +%Y%m%dT%H%M%SZ)',
        'mkdir -p "$B/$ts.partial"',
        ': > "$B/$ts.partial/ABSENT"',
    ]
    for name, path in layout.backed_up_files(caddyfile).items():
        q = shlex.quote(path)
        lines.append(f'if [ -e {q} ]; then cp -p {q} "$B/$ts.partial/{name}"; '
                     f'else echo {name} >> "$B/$ts.partial/ABSENT"; fi')
    lines += [
        # A runtime value, not a file: rollback sets it back.
        f'cat {layout.MIGRATE_REQ} > "$B/$ts.partial/tcp_migrate_req" 2>/dev/null || true',
        'mv "$B/$ts.partial" "$B/$ts"',
        f'ln -sfn "$ts" {layout.BACKUP_POINTER}',
    ]
    return "\n".join(lines)


def _pip_install(wheel_dir: str, pip_wheel: str) -> str:
    return (f"{layout.VENV}/bin/python {wheel_dir}/{pip_wheel}/pip install -q --no-index "
            f"--disable-pip-version-check --no-cache-dir --force-reinstall "
            f"--find-links {wheel_dir} 'orama-stealth[fast]'")


def install_router(wheel_dir: str, pip_wheel: str, fingerprint: str) -> str:
    """Install the router from the uploaded wheels only (a venv without ensurepip works
    without python3-venv); a running router then upgrades itself by reload, never restart.

    The reload runs the new build's own check and re-executes the supervisor in place: :443
    keeps accepting and open connections stay on the old workers until they end. When the new
    build cannot start (an import error, a config it rejects), the running router keeps
    serving with the old code, and the previous build's wheels (kept until the next successful
    install) are installed again so the node's disk matches what runs; the step fails with the
    router's reason."""
    mark = layout.INSTALLED_MARK
    wheels = layout.WHEELS
    config = layout.ROUTER_CONFIG
    return "\n".join([
        "set -u",
        f"[ -x {layout.VENV}/bin/python ] || python3 -m venv --without-pip {layout.VENV} || exit 1",
        f"prev=$(cat {mark} 2>/dev/null || true)",
        "refuse() {",
        f'  echo "orama-stealth: the router did not take build {fingerprint}: $1" >&2',
        f'  if [ -n "$prev" ] && [ -d {wheels}/"$prev" ]; then',
        f'    pipw=$(ls -d {wheels}/"$prev"/pip-*.whl | head -n 1)',
        f'    {layout.VENV}/bin/python "$pipw/pip" install -q --no-index '
        "--disable-pip-version-check --no-cache-dir --force-reinstall "
        f'--find-links {wheels}/"$prev" \'orama-stealth[fast]\' &&',
        f'    echo "$prev" > {mark} &&',
        '    echo "orama-stealth: build $prev installed again; the running router was never '
        'replaced" >&2',
        "  fi",
        "  exit 1",
        "}",
        f"{_pip_install(wheel_dir, pip_wheel)} || refuse 'pip install failed'",
        # The new build's own check: it imports all of the router and reads the config.
        f"if [ -e {config} ]; then",
        f"  out=$({layout.ROUTER_BIN} check --config {config} 2>&1 >/dev/null) || "
        '{ refuse "$(printf %s "$out" | tail -n 3)"; }',
        "else",
        f'  out=$({layout.ROUTER_BIN} --version 2>&1) || {{ refuse "$(printf %s "$out" | '
        'tail -n 3)"; }',
        "fi",
        f"echo {fingerprint} > {mark}",
        f"if systemctl is-active -q {UNIT} && [ ! -e {layout.ROUTER_STATUS} ]; then",
        '  echo "orama-stealth: the running router predates in-place upgrades: the unit step '
        'restarts it once" >&2',
        f"elif systemctl is-active -q {UNIT}; then",
        f"  if ! out=$(systemctl reload {UNIT} 2>&1); then",
        f"    why=$(journalctl -u {UNIT} -n 30 -o cat --no-pager 2>/dev/null | "
        "grep -E 'event=(upgrade_failed|reload_failed)' | tail -n 1)",
        '    refuse "${why:-$out}"',
        "  fi",
        "fi",
        # The previous build's wheels stay for the restore above; older ones go.
        f"find {wheels} -mindepth 1 -maxdepth 1 ! -name {fingerprint} "
        '! -name "${prev:-none}" -exec rm -rf {} +',
    ])


def install_checked(staged: str, dest: str, check: str, then: str = "") -> str:
    """Validate a staged file with the real tool, then move it into place."""
    d = shlex.quote(dest)
    return "\n".join([
        "set -eu",
        check,
        f"mkdir -p $(dirname {d})",
        f"install -m 0644 {shlex.quote(staged)} {d}",
        then,
    ])


def switch(https_to: int, http_to: int) -> str:
    """Caddy on :443/:80 -> the router on :443/:80 with Caddy on https_to/http_to, every new
    connection finding a listener: Caddy on both port pairs, the redirect to its new ports,
    Caddy on its new ports only, the router started, the redirect removed (deploy/handover.py).

    Without the staged handover files, or when Caddy refuses the JSON (admin API off), it
    falls back to stopping Caddy and starting the router (a short refusal window)."""
    caddy_gone = ("ss -ltnpH '( sport = :443 or sport = :80 )' | grep -q '\"caddy\"'")
    return "\n".join([
        "set -u",
        f"trap '{handover.delete_table()}; rm -f {handover.DUAL_JSON} {handover.REDIRECT_RULES}'"
        " EXIT",
        f"systemctl daemon-reload && systemctl enable -q {ALL_UNITS} || exit 1",
        f"if [ -s {handover.DUAL_JSON} ] && [ -s {handover.REDIRECT_RULES} ] && "
        f"{handover.caddy_reload_json()}; then",
        # Caddy on both port pairs keeps serving :443 if the redirect cannot be loaded.
        f"  {{ {handover.add_redirect()}; }} || exit 1",
        # Caddy lets go of :443/:80; new connections are redirected to its new ports meanwhile.
        "  systemctl reload caddy.service || exit 1",
        f"  for i in $(seq 1 50); do {caddy_gone} || break; sleep 0.1; done",
        f"  if ! {{ systemctl start {SOCKETS} && systemctl start {UNIT}; }}; then",
        # Caddy takes :443/:80 back: a failed start leaves the node serving :443.
        f"    systemctl stop {ALL_UNITS}; {handover.caddy_reload_json()}; exit 1",
        "  fi",
        f"  {handover.remove_redirect(https_to, http_to)}",
        "else",
        f"  {handover.delete_table()}",
        # The socket units bind :443/:80 the moment Caddy has let go of them, so clients wait
        # in the backlog while the router starts instead of being refused.
        f"  systemctl stop caddy.service && systemctl start {SOCKETS} && "
        f"systemctl start {UNIT} || exit 1",
        "fi",
        "systemctl start caddy.service",
    ])


# Caddy started under the drop-in of earlier releases lacks the capability: it cannot bind
# :443/:80 by a reload, so the rollback restarts it instead.
CADDY_CAN_BIND = ("{ c=$(awk '/^CapEff/ {print $2}' /proc/$(systemctl show -P MainPID "
                  "caddy.service)/status 2>/dev/null); [ -n \"$c\" ] && "
                  "[ $(( 0x$c & 0x400 )) -ne 0 ]; }")


# The router still has processes: `is-active` is false while it drains ("deactivating").
ROUTER_UP = (f"systemctl show -P ActiveState {UNIT} | "
             "grep -qxE 'active|activating|deactivating|reloading'")


# A listening socket's Recv-Q is its accept queue: connections the kernel completed that no
# process has accepted yet.
QUEUED = "ss -ltnH '( sport = :443 or sport = :80 )' | awk '$2 > 0 {q=1} END {exit !q}'"


def caddy_on(port: int) -> str:
    """Shell test: Caddy listens on `port`."""
    return f"ss -ltnpH 'sport = :{port}' | grep -q '\"caddy\"'"


def rollback(caddyfile: str, state_json: str, https_from: int = 8443,
             http_from: int = 8080) -> str:
    """From any state (half-done cutover included): router stopped, disabled and its unit gone,
    Caddy's files restored from the pre-cutover backup (or managed blocks stripped when there
    is none), Caddy on :443/:80 again, no redirect table left.
    The router config stays: it holds operator routes the next cutover keeps.

    With the staged handover files and Caddy on https_from/http_from, every new connection
    finds a listener: redirect to Caddy's ports, router stopped, Caddy on both port pairs,
    redirect removed, Caddy reloaded with the restored Caddyfile. Otherwise Caddy is
    restarted as soon as the router has let go of :443/:80, not after the router's drain:
    draining can take `drain_timeout`, and :443 would refuse connections all along."""
    cf = shlex.quote(caddyfile)
    p = layout.BACKUP_POINTER
    held = "ss -ltnH '( sport = :443 or sport = :80 )' | grep -q ."
    lines = [
        "set -u",
        f"trap '{handover.delete_table()}; rm -f {handover.DUAL_JSON} {handover.REDIRECT_RULES} "
        f"{handover.RESTORED_CADDYFILE}' EXIT",
        # A start that loses a race for :443/:80 (a listener closing a moment late) is tried
        # again; the last failure shows Caddy's own reason.
        "caddy_restart() {",
        "  for i in 1 2 3; do systemctl restart caddy.service && return 0; sleep 1; done",
        "  journalctl -u caddy.service -n 5 -o cat --no-pager >&2; return 1",
        "}",
        f"systemctl disable -q {ALL_UNITS} 2>/dev/null || true",
        f"migrate=$(cat {p}/tcp_migrate_req 2>/dev/null || true)",
        f"if [ -d {p}/ ]; then",
    ]
    for name, path in layout.backed_up_files(caddyfile).items():
        if path == layout.ROUTER_CONFIG:
            continue
        q = shlex.quote(path)
        lines += [
            f"  if [ -e {p}/{name} ]; then cp -p {p}/{name} {q};",
            f"  elif grep -qx {name} {p}/ABSENT; then rm -f {q}; fi",
        ]
    lines += [
        "else",
        f"  rm -f {layout.ROUTER_UNIT} {' '.join(layout.SOCKET_UNITS)} {layout.CADDY_DROPIN}",
        "fi",
        # Belt and braces: no managed block survives, whatever the backup held.
        f"[ -f {cf} ] && sed -i '/^[[:space:]]*# >>> orama-stealth managed/,"
        f"/^[[:space:]]*# <<< orama-stealth managed/d' {cf}",
        f"rmdir --ignore-fail-on-non-empty {shlex.quote(layout.CADDY_DROPIN.rsplit('/', 1)[0])}"
        " 2>/dev/null",
        "systemctl daemon-reload",
        # The router (or a socket unit) holds :443/:80: while it lets go, new connections are
        # redirected to Caddy's current ports (deploy/handover.py).
        "handed=0",
        f"if systemctl is-active -q {ALL_UNITS}; then",
        f"  if [ -s {handover.DUAL_JSON} ] && [ -s {handover.REDIRECT_RULES} ] && "
        f"{caddy_on(https_from)} && {caddy_on(http_from)} && {CADDY_CAN_BIND} && "
        f"{{ {handover.add_redirect()}; }}; then handed=1; fi",
        # Connections that reached :443/:80 just before the redirect are still in the router's
        # accept queue: closing the listeners now would reset them. Let the router take them.
        '  if [ "$handed" = 1 ]; then',
        f"    sleep 0.2; for i in $(seq 1 20); do {QUEUED} || break; sleep 0.1; done",
        "  fi",
        # The socket units' copies of :443/:80 would stay open until the router's drain ends
        # (their stop is ordered after the service's): close them now, apart from the service.
        f"  systemctl stop --no-block --job-mode=ignore-dependencies {SOCKETS} 2>/dev/null",
        # A stop job (not a kill): Restart=always must not bring the router back.
        f"  systemctl stop --no-block {ALL_UNITS}",
        f"  for i in $(seq 1 100); do {held} || break; sleep 0.1; done",
        # A router that has not let go is being removed anyway, and new connections are
        # redirected to Caddy or about to meet it: end it rather than leave Caddy no port.
        f"  if {held}; then systemctl kill -s SIGKILL {UNIT};",
        f"    for i in $(seq 1 50); do {held} || break; sleep 0.1; done; fi",
        "fi",
        'if [ "$handed" = 1 ]; then',
        # Caddy binds :443/:80 beside its current ports (the drop-in kept its capability),
        # then, with the redirect gone, lets go of its current ports.
        "  ok=0",
        f"  for i in $(seq 1 30); do {handover.caddy_reload_json()} && {{ ok=1; break; }}; "
        "sleep 0.1; done",
        '  if [ "$ok" = 1 ]; then',
        f"    {handover.remove_redirect(https_from, http_from)}",
        "    systemctl reload caddy.service || caddy_restart || exit 1",
        "  else",
        f"    {handover.delete_table()}",
        "    caddy_restart || exit 1",
        "  fi",
        f"elif {caddy_on(443)} && {caddy_on(80)}; then",
        # The cutover never switched: Caddy still has :443/:80 and reloads its restored files.
        "  systemctl reload caddy.service || caddy_restart || exit 1",
        "else",
        f"  {handover.delete_table()}",
        "  caddy_restart || exit 1",
        "fi",
        # Connections the router still relays go with it: a few seconds to finish, then it is
        # ended rather than waited for through drain_timeout (the pending stop job keeps
        # Restart=always from acting).
        f"for i in $(seq 1 50); do {ROUTER_UP} || break; sleep 0.1; done",
        f"{ROUTER_UP} && systemctl kill -s SIGKILL {UNIT}",
        f"systemctl stop {ALL_UNITS} 2>/dev/null",
        # After Caddy's last reload of the rollback, which still wants the migration.
        f"rm -f {layout.SYSCTL_DROPIN}",
        f'[ -n "$migrate" ] && echo "$migrate" > {layout.MIGRATE_REQ} 2>/dev/null',
        f"systemctl reset-failed {ALL_UNITS} 2>/dev/null",
        source_routing.remove(),  # the real-address mode's policy routing, if any
        f"rm -f {p}",
        f"mkdir -p {layout.STATE_DIR}",
        f"printf '%s\\n' {shlex.quote(state_json)} > {layout.STATE_FILE}",
        "true",
    ]
    return "\n".join(lines)


def restart_once(https_to: int, http_to: int) -> str:
    """The one restart a router from a release before in-place upgrades needs. New
    connections go straight to Caddy's ports meanwhile (the handover's redirect, staged
    beforehand), so :443 keeps answering while the old router drains; connections it relays
    end with its drain."""
    return "\n".join([
        "set -u",
        f"trap '{handover.delete_table()}; rm -f {handover.REDIRECT_RULES}' EXIT",
        f"redirected=0; [ -s {handover.REDIRECT_RULES} ] && "
        f"{{ {handover.add_redirect()}; }} && redirected=1",
        'if [ "$redirected" = 1 ]; then',
        f"  sleep 0.2; for i in $(seq 1 20); do {QUEUED} || break; sleep 0.1; done",
        "fi",
        f"systemctl daemon-reload && systemctl restart {UNIT} || exit 1",
        f'if [ "$redirected" = 1 ]; then {handover.remove_redirect(https_to, http_to)}; fi',
    ])
