"""kvpn relay: WireGuard datagrams between `kubectl vpn up --via api` port-forwards and the gateways."""
