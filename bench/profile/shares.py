# Share of profile samples (inclusive) under a few frames, from folded stacks
# (gzip or plain): python3 bench/profile/shares.py before.folded.gz after.folded.gz
import collections, gzip, re, sys
keys={'pipe2 (Pipe::new)':r'__x64_sys_pipe2','fcntl (F_SETPIPE_SZ)':r'__x64_sys_fcntl','close':r'__x64_sys_close','recvfrom':r'__x64_sys_recvfrom','setsockopt':r'__x64_sys_setsockopt','getpid':r'__x64_sys_getpid','splice':r'__x64_sys_splice','backtrace capture':r'Backtrace.*capture|_Unwind_Backtrace','close-line logging':r'tracing_subscriber::fmt::Subscriber.*event','sendto':r'__x64_sys_sendto','connect':r'__x64_sys_connect','shutdown':r'__x64_sys_shutdown','epoll_ctl':r'__x64_sys_epoll_ctl','malloc/free':r'^(malloc|free|_int_malloc|_int_free|cfree|__libc_calloc|calloc)$'}
for f in sys.argv[1:]:
    tot=0; inc=collections.Counter()
    for line in (gzip.open(f, "rt") if f.endswith(".gz") else open(f)):
        stack,n=line.rsplit(' ',1); n=int(n); tot+=n
        frames=stack.split(';')
        for k,pat in keys.items():
            if any(re.search(pat,fr) for fr in frames): inc[k]+=n
    print(f, 'samples',tot)
    for k in keys: print(f"   {k:22} {100*inc[k]/tot:5.1f}%")
