#!/usr/bin/env bash
# Builds the project's container image with podman.
#
#   bash scripts/build_image.sh         # GPU flavour: the Dockerfile on lmsysorg/sglang (Docker Hub) -> srpo-megatron:gpu
#   bash scripts/build_image.sh --cpu   # CPU flavour: the same Dockerfile on a base made here -> srpo-megatron:cpu
#
# The CPU base needs no image registry: Dockerfile.cpu-base (Python 3.12 venv, torch, transformers) on
# Ubuntu noble made by debootstrap from Ubuntu's archive. It is tagged srpo-megatron-cpu-base:<hash of
# its inputs> and reused while they are unchanged. Making it took 6 minutes here and 6 GB, plus up
# to 25 GB of temporary disk while podman commits the torch layer.
# Every build step sees the host's CA bundle (pip behind a TLS-intercepting proxy); no image keeps it.
# Run as root on a machine without podman, the script installs it with apt and writes the host
# settings podman needs here to /etc/containers/containers.conf.d/, saying what it changed.
# Exit status 77: this machine cannot build the image (podman missing and not installable, or the CPU
# base to make without root); scripts/test_image.sh reports that as a skip.
set -euo pipefail
cd "$(dirname "$0")/.."

cpu=0
for arg in "$@"; do
  case "$arg" in
    --cpu) cpu=1 ;;
    *) echo "build_image.sh: unknown argument $arg (known: --cpu)" >&2; exit 2 ;;
  esac
done

say() { echo "build_image: $*"; }
die() { echo "build_image: $*" >&2; exit 1; }
cannot() { echo "build_image: cannot build here: $*" >&2; exit 77; }

# The CPU base's inputs besides Dockerfile.cpu-base. noble is the Ubuntu release with Python 3.12
# (Debian trixie has 3.13); bookworm's debootstrap has no noble script, gutsy's is the one all later
# Ubuntu releases use. Ubuntu's keyring is no Debian package: its .deb comes from the archive,
# checked against the hash noble's Packages index lists for it.
ubuntu_suite=noble
ubuntu_mirror=http://archive.ubuntu.com/ubuntu
ubuntu_packages=python3.12-venv,ca-certificates
keyring_deb=pool/main/u/ubuntu-keyring/ubuntu-keyring_2023.11.28.1_all.deb
keyring_sha256=36de43b15853ccae0028e9a767613770c704833f82586f28eb262f0311adb8a8
base_repo=localhost/srpo-megatron-cpu-base
label=srpo-megatron.image
# Measured: committing the base's torch layer took 22-25 GB of temporary disk, and the base keeps 6 GB.
base_disk_gb=35

apt_install() {
  command -v apt-get >/dev/null || cannot "$* missing, and this machine has no apt-get to install it"
  [[ $EUID == 0 ]] || cannot "$* missing; installing it needs root"
  say "installing $* with apt-get"
  local log
  log="$(mktemp)"
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"; } >"$log" 2>&1; then
    tail -n 5 "$log" >&2; rm -f "$log"
    cannot "apt-get could not install $*"
  fi
  rm -f "$log"
  say "installed $*"
}

has_cap_sys_resource() {
  local capeff
  capeff="$(awk '/^CapEff:/ {print $2}' /proc/self/status)"
  (( (16#$capeff >> 24) & 1 ))  # CAP_SYS_RESOURCE is capability 24
}

# The settings this host needs, each only where the reason holds (so a host where podman's defaults
# work is left alone), written to one drop-in file that says why.
configure_podman() {
  local conf=/etc/containers/containers.conf.d/50-srpo-megatron.conf
  local containers=() engine=() why=()
  if [[ "$(stat -fc %T /sys/fs/cgroup)" != cgroup2fs ]]; then
    engine+=('runtime = "runc"')
    why+=("# runtime runc: cgroups v1/hybrid here, which crun refuses (\"cgroups in hybrid mode not supported\").")
    command -v runc >/dev/null || apt_install runc
  fi
  if [[ ! -d /run/systemd/system ]]; then
    engine+=('cgroup_manager = "cgroupfs"')
    why+=("# cgroup_manager cgroupfs: systemd is not running, so its cgroup manager is not there.")
  fi
  if ! has_cap_sys_resource; then
    # Without CAP_SYS_RESOURCE no limit can go above the one podman itself runs under: the hard
    # limit it is started with, and for processes the kernel's pid_max (measured: podman ran under
    # nproc 32768 = pid_max, started from a shell with 96367).
    local nofile nproc pid_max limits
    nofile="$(ulimit -Hn)"; nproc="$(ulimit -Hu)"; pid_max="$(cat /proc/sys/kernel/pid_max)"
    [[ "$nproc" == unlimited || "$nproc" -gt "$pid_max" ]] && nproc="$pid_max"
    limits="\"nproc=$nproc:$nproc\""
    [[ "$nofile" == unlimited ]] || limits="\"nofile=$nofile:$nofile\", $limits"
    containers+=("default_ulimits = [$limits]")
    why+=("# default_ulimits at the hard limits: root lacks CAP_SYS_RESOURCE, and podman's defaults fail
# (\"error setting rlimit type 7: operation not permitted\").")
  fi
  ((${#why[@]})) || return 0
  local want
  want="$(
    echo "# Written by srpo_megatron's scripts/build_image.sh: what podman needs on this host."
    printf '%s\n' "${why[@]}"
    if ((${#containers[@]})); then echo "[containers]"; printf '%s\n' "${containers[@]}"; fi
    if ((${#engine[@]})); then echo "[engine]"; printf '%s\n' "${engine[@]}"; fi
  )"
  [[ -f "$conf" && "$(cat "$conf")" == "$want" ]] && return 0
  mkdir -p "$(dirname "$conf")"
  echo "$want" >"$conf"
  say "wrote $conf:"
  sed 's/^/    /' "$conf"
}

setup_podman() {
  command -v podman >/dev/null || apt_install podman runc
  [[ $EUID == 0 ]] && configure_podman
  return 0
}

host_ca_bundle() {
  local f
  for f in "${SSL_CERT_FILE:-}" /etc/ssl/certs/ca-certificates.crt /etc/pki/tls/certs/ca-bundle.crt; do
    [[ -n "$f" && -f "$f" ]] && { echo "$f"; return; }
  done
  die "no CA bundle on this host (looked at \$SSL_CERT_FILE and the Debian and Red Hat paths): set SSL_CERT_FILE"
}

# Sets $base to the CPU base, made unless an image of it with the same inputs exists.
make_cpu_base() {
  local hash
  hash="$(
    { cat Dockerfile.cpu-base
      echo "$ubuntu_suite $ubuntu_mirror $ubuntu_packages $keyring_deb $keyring_sha256"; } | sha256sum | cut -c1-16
  )"
  base="$base_repo:$hash"
  if podman image exists "$base"; then
    say "reusing the CPU base $base (its inputs are unchanged)"
    return
  fi
  [[ $EUID == 0 ]] || cannot "the CPU base $base does not exist yet, and making it (debootstrap) needs root"
  local storage avail
  storage="$(podman info --format '{{.Store.GraphRoot}}')"
  avail="$(df --output=avail -BG "$storage" | tail -n 1 | tr -dc 0-9)"
  ((avail >= base_disk_gb)) || die "making the CPU base needs about $base_disk_gb GB free under $storage; $avail GB are"
  command -v debootstrap >/dev/null || apt_install debootstrap

  local tmp
  tmp="$(mktemp -d /var/tmp/srpo-megatron-base.XXXXXX)"
  # shellcheck disable=SC2064  # expand now: $tmp is local
  trap "rm -rf '$tmp'" EXIT
  say "making the CPU base $base: debootstrap of Ubuntu $ubuntu_suite (about 30 s)"
  curl -fsS -o "$tmp/keyring.deb" "$ubuntu_mirror/$keyring_deb"
  echo "$keyring_sha256  $tmp/keyring.deb" | sha256sum --check --quiet \
    || die "$ubuntu_mirror/$keyring_deb does not have the sha256 noble lists for it"
  dpkg-deb -x "$tmp/keyring.deb" "$tmp/keyring"
  if ! debootstrap --variant=minbase --components=main,universe --include="$ubuntu_packages" \
      --keyring="$tmp/keyring/usr/share/keyrings/ubuntu-archive-keyring.gpg" \
      "$ubuntu_suite" "$tmp/rootfs" "$ubuntu_mirror" /usr/share/debootstrap/scripts/gutsy >"$tmp/debootstrap.log" 2>&1; then
    tail -n 20 "$tmp/debootstrap.log" >&2
    die "debootstrap of Ubuntu $ubuntu_suite failed (its log's end above)"
  fi
  rm -rf "$tmp/rootfs/var/cache/apt/archives/"*.deb "$tmp/rootfs/var/lib/apt/lists/"*
  tar -C "$tmp/rootfs" -c . | podman import --quiet - "$base_repo-rootfs:$hash" >/dev/null
  rm -rf "$tmp/rootfs"
  say "installing torch and transformers into the CPU base (about 5 minutes, 6 GB)"
  mkdir "$tmp/context"
  podman build --file Dockerfile.cpu-base --build-arg ROOTFS="$base_repo-rootfs:$hash" --label "$label=cpu-base" \
    --volume "$ca_bundle:/etc/ssl/certs/ca-certificates.crt:ro" --tag "$base" "$tmp/context"
  podman rmi "$base_repo-rootfs:$hash" >/dev/null  # the tag only: the layer stays, under the base
  rm -rf "$tmp"
  trap - EXIT
}

# Builds the Dockerfile as $1 (flavour $2) with the build arguments that follow; $3 is said when
# the build fails. Then removes what earlier builds of it left untagged: the image the tag named
# before, and cached layers of sources that have changed since. Every image and layer built here
# carries $label (podman gives a build's labels to its cached layers too), so no other is touched.
build() {
  local tag="$1" flavour="$2" hint="$3"
  shift 3
  say "building $tag"
  podman build --file Dockerfile --label "$label=$flavour" \
    --volume "$ca_bundle:/etc/ssl/certs/ca-certificates.crt:ro" --tag "$tag" "$@" . \
    || die "podman build of $tag failed (its output above)$hint"
  podman image prune --force --filter "label=$label" >/dev/null
}

setup_podman
ca_bundle="$(host_ca_bundle)"
say "handing the host's CA bundle $ca_bundle to each build step (mounted read-only, not stored in the image)"
start=$SECONDS
if [[ "$cpu" == 1 ]]; then
  tag=localhost/srpo-megatron:cpu
  make_cpu_base
  build "$tag" cpu "" --build-arg BASE_IMAGE="$base" --build-arg WITH_TE=0
  # Bases made from other inputs: the image just built no longer uses them.
  for old in $(podman images --filter reference="$base_repo" --format '{{.Repository}}:{{.Tag}}'); do
    [[ "$old" == "$base" ]] && continue
    if said="$(podman rmi "$old" 2>&1)"; then
      say "removed the old CPU base $old"
    else
      say "kept the old CPU base $old: ${said##*$'\n'}"
    fi
  done
else
  tag=localhost/srpo-megatron:gpu
  build "$tag" gpu "; if pulling its base failed, no registry is reachable from here: build the CPU flavour (--cpu)"
fi
say "built $tag in $((SECONDS - start)) s: $(podman image inspect --format '{{.Size}}' "$tag" | awk '{printf "%.1f GB", $1 / 1e9}')"
