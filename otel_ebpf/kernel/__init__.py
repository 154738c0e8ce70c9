"""Everything that talks to BPF: building and loading the program (program.py, loader.py), attaching
uprobes at any time (attach.py), the ring buffers (ring.py), the mirrors of bpf/*.h (layout.py), raw
system calls (bpf.py) and what the kernel requires of us (privileges.py)."""
