"""What the tests (and bench/) share: real servers on loopback, bounded waits, audio
decoding, tenants committed for servers in other processes, the tiny XTTS engine."""
