"""kvpn operator."""
