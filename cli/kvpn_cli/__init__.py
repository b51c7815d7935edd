"""kubectl-vpn: the developer's kubectl plugin for kvpn."""
