"""kvpn node agent."""
