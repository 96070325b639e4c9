# The Python 3.12 base grpoflow-gpu builds on where python:3.12-slim-bookworm cannot be pulled:
# containers/build.sh makes it as localhost/python:3.12-bookworm from the Debian bookworm base and a
# CPython 3.12 installed on this host (PYTHON312; a pyenv build by default), which it passes in the
# build context as python.tar. Laid out as in python:3.12-slim-bookworm: the interpreter in /usr/local.
#   PACKAGES    the Debian packages of the shared libraries that CPython links against (build.sh finds
#               them with ldd and dpkg on the host, which must be bookworm too)
#   OLD_PREFIX  the prefix the host's CPython was installed at; the scripts (pip's shebang) and
#               sysconfig's data name it, and are rewritten to /usr/local
ARG BASE=localhost/debian:bookworm
FROM ${BASE}
ARG PACKAGES
ARG OLD_PREFIX

ENV LANG=C.UTF-8

# apt-get clean: a base made with debootstrap, unlike Debian's published images, keeps the .debs
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates $PACKAGES \
    && apt-get clean && rm -rf /var/lib/apt/lists/*
ADD python.tar /usr/local/
# Its RUNPATH names the old prefix, which is not here: libpython is found through ld.so's cache instead.
# The build fails if any library is missing or a module CPython's users expect does not import.
RUN grep -rlIZ -- "$OLD_PREFIX" /usr/local | xargs -0 -r sed -i "s|$OLD_PREFIX|/usr/local|g" \
    && ldconfig \
    && missing=$(find /usr/local -name '*.so*' -type f -exec ldd {} + 2>/dev/null | awk '/:$/ {f = $0} /not found/ {print f, $1}') \
    && { [ -z "$missing" ] || { echo "libraries not found: $missing" >&2; exit 1; }; } \
    && python3 -c "import sys; assert sys.version_info[:2] == (3, 12) and sys.prefix == '/usr/local', sys.prefix; \
import bz2, ctypes, decimal, hashlib, lzma, readline, sqlite3, ssl, uuid, zlib" \
    && python3 -m pip --version \
    && pip --version

CMD ["python3"]
