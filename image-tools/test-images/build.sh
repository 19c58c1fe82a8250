#!/usr/bin/env bash
# Builds little.cloud's test images offline from Debian packages, with no
# Docker engine: mmdebstrap writes a root filesystem tarball, umoci makes it
# an OCI image and sets its config, skopeo copies it into a `docker save`
# archive. Results are cached under target/test-images/ (or $1): an image is
# rebuilt only when this script changes.
#
#   <out>/<name>.oci/          OCI image layout, tag "latest"
#   <out>/<name>.docker.tar    `docker save` archive, tag little-test/<name>:latest
#
# Images:
#   httpd  busybox httpd on 8080 as user "web" (uid 1000, groups web+staff),
#          serving /www, two layers (busybox, then accounts and pages)
#   redis  Debian's redis-server on 6379 as user "redis", two layers (the
#          second deletes a file of the first: a whiteout)
#   postgresql  Debian's PostgreSQL 15 on 5432 as user "postgres", one layer;
#          $PGDATA (/var/lib/postgresql/data) is made by initdb at build
#          time (superuser postgres, password "little" over TCP)
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
OUT=${1:-${CARGO_TARGET_DIR:-$REPO/target}/test-images}
SUITE=bookworm
STAMP=$(sha256sum "$HERE/build.sh" | cut -c1-16)

# The host's apt sources when they exist (the mirror this machine reaches).
MIRROR=http://deb.debian.org/debian
[ -f /etc/apt/sources.list.d/debian.sources ] && MIRROR=/etc/apt/sources.list.d/debian.sources

for tool in mmdebstrap umoci skopeo; do
	command -v "$tool" >/dev/null || { echo "test-images: $tool is missing (scripts/setup.sh installs it)" >&2; exit 1; }
done
mkdir -p "$OUT"

# finish NAME LAYOUT: tag, copy to a docker archive, stamp.
finish() {
	local name=$1 layout=$2
	umoci gc --layout "$layout"
	rm -f "$OUT/$name.docker.tar"
	skopeo --insecure-policy copy --quiet "oci:$layout:latest" \
		"docker-archive:$OUT/$name.docker.tar:little-test/$name:latest"
	rm -rf "$OUT/$name.oci"
	mv "$layout" "$OUT/$name.oci"
	echo "$STAMP" >"$OUT/$name.stamp"
	echo "test-images: built $name" >&2
}

fresh() {
	[ -f "$OUT/$1.stamp" ] && [ "$(cat "$OUT/$1.stamp")" = "$STAMP" ] &&
		[ -d "$OUT/$1.oci" ] && [ -f "$OUT/$1.docker.tar" ]
}

build_httpd() {
	fresh httpd && return 0
	local work
	work=$(mktemp -d "$OUT/.httpd.XXXXXX")
	trap 'rm -rf "$work"' RETURN
	mmdebstrap --quiet --variant=extract --include=busybox-static \
		"$SUITE" "$work/rootfs.tar" "$MIRROR"
	# Second layer: accounts, the document root, a hard link.
	mkdir -p "$work/layer2/etc" "$work/layer2/www" "$work/layer2/tmp"
	printf 'root:x:0:0:root:/root:/bin/sh\nweb:x:1000:1000:web:/www:/bin/sh\n' >"$work/layer2/etc/passwd"
	printf 'root:x:0:\nstaff:x:50:web\nweb:x:1000:\n' >"$work/layer2/etc/group"
	echo '<h1>little-test-httpd</h1>' >"$work/layer2/www/index.html"
	ln "$work/layer2/www/index.html" "$work/layer2/www/hardlink.html"
	chmod 1777 "$work/layer2/tmp"
	tar --numeric-owner --owner=0 --group=0 -C "$work/layer2" -cf "$work/layer2.tar" etc www tmp
	umoci init --layout "$work/oci"
	umoci new --image "$work/oci:latest"
	umoci raw add-layer --image "$work/oci:latest" "$work/rootfs.tar"
	umoci raw add-layer --image "$work/oci:latest" "$work/layer2.tar"
	umoci config --image "$work/oci:latest" \
		--config.entrypoint /bin/busybox \
		--config.entrypoint httpd --config.entrypoint -f --config.entrypoint -v \
		--config.cmd -p --config.cmd 8080 --config.cmd -h --config.cmd /www \
		--config.user web --config.workingdir /www \
		--config.exposedports 8080/tcp \
		--config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
		--config.env LITTLE_TEST=httpd \
		--config.stopsignal SIGTERM \
		--architecture amd64 --os linux
	finish httpd "$work/oci"
	rm -rf "$work"
}

build_redis() {
	fresh redis && return 0
	local work
	work=$(mktemp -d "$OUT/.redis.XXXXXX")
	trap 'rm -rf "$work"' RETURN
	mmdebstrap --quiet --variant=minbase --include=redis-server \
		--customize-hook='rm -rf "$1/var/lib/apt/lists"/* "$1/var/cache/apt"/* "$1/usr/share/doc" "$1/usr/share/man"' \
		"$SUITE" "$work/rootfs.tar" "$MIRROR"
	# Second layer: a whiteout for a file of the first, and a config file.
	mkdir -p "$work/layer2/etc/redis"
	touch "$work/layer2/etc/redis/.wh.redis.conf"
	printf 'bind 0.0.0.0\nprotected-mode no\nsave ""\nappendonly no\nport 6379\n' >"$work/layer2/etc/redis/little.conf"
	tar --numeric-owner --owner=0 --group=0 -C "$work/layer2" -cf "$work/layer2.tar" etc
	umoci init --layout "$work/oci"
	umoci new --image "$work/oci:latest"
	umoci raw add-layer --image "$work/oci:latest" "$work/rootfs.tar"
	umoci raw add-layer --image "$work/oci:latest" "$work/layer2.tar"
	umoci config --image "$work/oci:latest" \
		--config.entrypoint redis-server \
		--config.cmd /etc/redis/little.conf \
		--config.user redis --config.workingdir /var/lib/redis \
		--config.exposedports 6379/tcp \
		--config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
		--config.stopsignal SIGTERM \
		--architecture amd64 --os linux
	finish redis "$work/oci"
	rm -rf "$work"
}

# Runs in mmdebstrap's customize hook, $1 the new root: drops the cluster
# Debian's postinst made, initdb's $PGDATA as postgres, trims the image.
POSTGRES_HOOK='set -eu
bin=/usr/lib/postgresql/15/bin data=/var/lib/postgresql/data
[ -x "$1$bin/postgres" ] || { echo "test-images: no $bin/postgres" >&2; exit 1; }
if [ -d "$1/etc/postgresql/15/main" ]; then chroot "$1" pg_dropcluster 15 main; fi
chroot "$1" install -d -o postgres -g postgres -m 0700 "$data"
echo little >"$1/tmp/pw" && chroot "$1" chown postgres /tmp/pw
chroot "$1" runuser -u postgres -- "$bin/initdb" --pgdata="$data" \
	--username=postgres --pwfile=/tmp/pw --auth-local=peer \
	--auth-host=scram-sha-256 --encoding=UTF8 --locale=C.UTF-8 \
	--no-sync --no-instructions >/dev/null
rm -f "$1/tmp/pw"
# shared_buffers fits a 128 MiB guest (the default 128MB does not); a
# crash recovery syncs the data directory with one syncfs, not an fsync
# of every file (each a flush of the volume on the host).
printf "listen_addresses = \047*\047\nunix_socket_directories = \047/tmp\047\n%s\n" \
	"dynamic_shared_memory_type = posix" "shared_buffers = 16MB" \
	"recovery_init_sync_method = syncfs" >>"$1$data/postgresql.conf"
printf "%s\n" "host all all 0.0.0.0/0 scram-sha-256" \
	"host all all ::/0 scram-sha-256" >>"$1$data/pg_hba.conf"
rm -rf "$1/var/lib/apt/lists"/* "$1/var/cache/apt"/* "$1/usr/share/doc" "$1/usr/share/man"'

build_postgresql() {
	fresh postgresql && return 0
	local work
	work=$(mktemp -d "$OUT/.postgresql.XXXXXX")
	trap 'rm -rf "$work"' RETURN
	mmdebstrap --quiet --variant=minbase --include=postgresql \
		--customize-hook="$POSTGRES_HOOK" \
		"$SUITE" "$work/rootfs.tar" "$MIRROR"
	umoci init --layout "$work/oci"
	umoci new --image "$work/oci:latest"
	umoci raw add-layer --image "$work/oci:latest" "$work/rootfs.tar"
	umoci config --image "$work/oci:latest" \
		--config.entrypoint /usr/lib/postgresql/15/bin/postgres \
		--config.user postgres --config.workingdir /var/lib/postgresql \
		--config.exposedports 5432/tcp \
		--config.env PATH=/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
		--config.env PGDATA=/var/lib/postgresql/data \
		--config.stopsignal SIGINT \
		--architecture amd64 --os linux
	finish postgresql "$work/oci"
	rm -rf "$work"
}

build_httpd
build_redis
build_postgresql
