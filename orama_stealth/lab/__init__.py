"""The lab node: a real systemd + sshd + Caddy + coturn test node on this machine."""
