"""`telemetry-nb dashboard`: serve notebooks/dashboard.ipynb with Voilà, and the widget app that notebook shows.

The app (`Dashboard`) renders every chart to SVG with vl-convert inside the kernel, so the page needs
no JavaScript from a CDN: Voilà's own bundled widget manager is all the browser loads. Heavy imports
(ipywidgets, pandas, altair) happen inside the app, so building the CLI parser stays fast.
"""

from __future__ import annotations

import argparse
import html
import os
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

DEFAULT_API_URL = "http://127.0.0.1:8000"
WINDOWS = ("5m", "15m", "1h", "6h", "24h", "7d")
MAX_ELEMENTS = 20_000  # GPUs × buckets per metric and refresh: a big fleet gets wider buckets, not a slow page
FLEET_ROWS = 64  # more GPUs than this in view: the heatmap shows one row per host
BAR_HOSTS = 40  # per-host bars: the busiest and the idlest 20 of a bigger fleet
FULL_RELOAD_EVERY = 20  # refreshes; the others slide the window, asking only for its newest buckets


def notebooks_dir() -> Path:
    """The notebooks: $TELEMETRY_NOTEBOOKS, the checkout's, the installed copy, or /app/notebooks in the image."""
    checkout = Path(__file__).resolve().parents[2] / "notebooks"  # telemetry_nb/analysis/dashboard.py → repo root
    candidates = [os.environ.get("TELEMETRY_NOTEBOOKS", ""), str(checkout),
                  str(Path(sys.prefix) / "share" / "telemetry-nb" / "notebooks"), "/app/notebooks"]
    for c in candidates:
        if c and (Path(c) / "dashboard.ipynb").exists():
            return Path(c)
    raise FileNotFoundError("notebooks/dashboard.ipynb not found; set TELEMETRY_NOTEBOOKS to the notebooks folder")


TEMPLATE = "telemetry-nb"  # notebooks/voila/templates/telemetry-nb: Voilà's lab template minus its CDN links


def voila_command(port: int, host: str = "127.0.0.1", notebook: Path | None = None) -> list[str]:
    nb = notebook or notebooks_dir() / "dashboard.ipynb"
    cmd = [sys.executable, "-m", "voila", str(nb), f"--port={port}", f"--Voila.ip={host}", "--no-browser",
           "--show_tracebacks=True", "--Voila.port_retries=0"]
    if (template_root(nb) / "voila" / "templates" / TEMPLATE).is_dir():
        cmd.append(f"--template={TEMPLATE}")
    return cmd


def template_root(notebook: Path) -> Path:
    """The folder holding `voila/templates/telemetry-nb` next to the dashboard notebook (goes on JUPYTER_PATH)."""
    return notebook.resolve().parent


def voila_env(notebook: Path, env: dict[str, str]) -> dict[str, str]:
    env = dict(env)
    root = str(template_root(notebook))
    env["JUPYTER_PATH"] = os.pathsep.join(p for p in (root, env.get("JUPYTER_PATH", "")) if p)
    _writable_jupyter_dirs(env)
    return env


def _writable_jupyter_dirs(env: dict[str, str]) -> None:
    """Point Jupyter's runtime/data dirs at /tmp when $HOME is read-only (a hardened container)."""
    home = Path(env.get("HOME") or Path.home())
    if os.access(home, os.W_OK):
        return
    base = Path(tempfile.gettempdir()) / "telemetry-nb-jupyter"
    env.setdefault("JUPYTER_RUNTIME_DIR", str(base / "runtime"))
    env.setdefault("JUPYTER_DATA_DIR", str(base / "data"))
    env.setdefault("IPYTHONDIR", str(base / "ipython"))
    env.setdefault("MPLCONFIGDIR", str(base / "mpl"))


def cmd_dashboard(args: argparse.Namespace) -> int:
    from telemetry_nb.extras import missing_notebook_modules, notebooks_extra_message

    missing = missing_notebook_modules()
    if missing:
        print(f"error: {notebooks_extra_message('the dashboard', missing)}", file=sys.stderr)
        return 2
    env = dict(os.environ)
    if args.api_url:
        env["TELEMETRY_API_URL"] = args.api_url
    env.setdefault("TELEMETRY_API_URL", DEFAULT_API_URL)
    if args.refresh is not None:
        env["TELEMETRY_DASHBOARD_REFRESH_S"] = str(args.refresh)
    if args.api_token:  # to the kernel through the environment, never on Voilà's command line
        env["TELEMETRY_API_TOKEN"] = args.api_token
    try:
        notebook = Path(args.notebook) if args.notebook else notebooks_dir() / "dashboard.ipynb"
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not notebook.is_file():
        print(f"error: dashboard notebook not found: {notebook}", file=sys.stderr)
        return 2
    print(f"Dashboard on http://{args.host}:{args.port} over API {env['TELEMETRY_API_URL']}", file=sys.stderr,
          flush=True)
    cmd, env = voila_command(args.port, args.host, notebook), voila_env(notebook, env)
    if os.name == "posix":  # become Voilà, so SIGTERM/SIGINT from a supervisor reach it directly
        sys.stdout.flush()
        sys.stderr.flush()
        os.execvpe(cmd[0], cmd, env)
    return subprocess.call(cmd, env=env)


def add_parser(sub, common) -> None:
    p = sub.add_parser("dashboard", help="serve the Voilà dashboard",
                       description="Serve notebooks/dashboard.ipynb with Voilà (no code cells shown, no CDN).")
    p.add_argument("--port", type=int, default=8866, help="port (default 8866)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--api-url", help=f"API base URL (default $TELEMETRY_API_URL or {DEFAULT_API_URL})")
    p.add_argument("--api-token", help="bearer token for the API (default $TELEMETRY_API_TOKEN, which keeps it "
                                       "out of the process list)")
    p.add_argument("--refresh", type=int, help="auto-refresh period in seconds (default 30; 0 turns it off)")
    p.add_argument("--notebook", help="dashboard notebook (default notebooks/dashboard.ipynb)")
    p.add_argument("--log-level", default="INFO", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_dashboard)


# -- the app the notebook shows ------------------------------------------------------------------
CSS = """
<style>
.tnb-cards{display:flex;gap:12px;flex-wrap:wrap;margin:4px 0 8px 0}
.tnb-card{border:1px solid #ddd;border-radius:8px;padding:10px 16px;min-width:140px;background:#fafafa}
.tnb-card .v{font-size:26px;font-weight:600;color:#222}
.tnb-card .k{font-size:12px;color:#666;text-transform:uppercase;letter-spacing:.04em}
.tnb-status{font-size:12px;color:#666}
.tnb-error{color:#a00;background:#fee;border:1px solid #f99;border-radius:6px;padding:8px 12px}
.tnb-table{border-collapse:collapse;font-size:12px}
.tnb-table th,.tnb-table td{border-bottom:1px solid #eee;padding:3px 8px;text-align:left}
</style>
"""


def _cards(items: list[tuple[str, str]]) -> str:
    cells = "".join(f'<div class="tnb-card"><div class="v">{html.escape(v)}</div><div class="k">{html.escape(k)}'
                    f"</div></div>" for k, v in items)
    return f'{CSS}<div class="tnb-cards">{cells}</div>'


def _table(df, limit: int = 15) -> str:
    if df is None or df.empty:
        return '<p class="tnb-status">none</p>'
    more = f'<p class="tnb-status">… and {len(df) - limit} more</p>' if len(df) > limit else ""
    return df.head(limit).to_html(index=False, classes="tnb-table", border=0, float_format=lambda x: f"{x:.1f}") + more


def _set_options(dropdown, options: list[tuple[str, str]], keep: str) -> None:
    """Replace a Dropdown's options, keeping its value when it is still offered (else the first option)."""
    if list(dropdown.options) == options:
        return
    values = [v for _, v in options]
    dropdown.options = options
    dropdown.value = keep if keep in values else values[0]


class Dashboard:
    """Fleet overview, pickers (host, GPU, metric, window) and charts as SVG, refreshed every `refresh_s`."""

    def __init__(self, api_url: str | None = None, *, refresh_s: int | None = None, window: str = "15m",
                 idle_threshold: float = 5.0, api_token: str | None = None):
        import ipywidgets as w

        from telemetry_nb.analysis import explore
        from telemetry_nb.analysis.client import TelemetryClient

        self.ex = explore
        self.api_url = api_url or os.environ.get("TELEMETRY_API_URL") or DEFAULT_API_URL
        if refresh_s is None:
            refresh_s = int(os.environ.get("TELEMETRY_DASHBOARD_REFRESH_S") or 30)
        self.refresh_s = refresh_s
        self.idle_threshold = idle_threshold
        self.client = TelemetryClient(self.api_url, token=api_token, timeout=20)  # token default: $TELEMETRY_API_TOKEN
        self.loaded: dict | None = None
        self.svg = explore.svg_renderer()
        self.svg.warm()
        self.metric_names: list[str] | None = None
        self.refreshes = 0
        self.errors: list[str] = []
        self._busy = False

        self.status = w.HTML(f'<span class="tnb-status">API {html.escape(self.api_url)}: loading…</span>')
        self.error = w.HTML("")
        self.cards = w.HTML(_cards([("GPUs", "…"), ("hosts", "…"), ("utilization now", "…"), ("idle GPUs", "…")]))
        self.host = w.Dropdown(description="Host", options=[("All hosts", "")], value="",
                               layout=w.Layout(width="260px"))
        self.gpu = w.Dropdown(description="GPU", options=[("All GPUs", "")], value="", layout=w.Layout(width="300px"))
        self.metric = w.Dropdown(description="Metric", options=[(explore.short(explore.UTIL), explore.UTIL)],
                                 value=explore.UTIL, layout=w.Layout(width="260px"))
        self.window = w.Dropdown(description="Window", options=list(WINDOWS), value=window,
                                 layout=w.Layout(width="180px"))
        self.refresh_button = w.Button(description="Refresh", icon="refresh", layout=w.Layout(width="100px"))
        self.timer = w.Play(value=0, min=0, max=10**9, step=1, interval=max(refresh_s, 1) * 1000,
                            show_repeat=False, description="auto-refresh", layout=w.Layout(width="120px"),
                            tooltip=f"auto-refresh every {refresh_s}s")
        self.heatmap = w.HTML(layout=w.Layout(overflow="auto"))
        self.timeseries = w.HTML(layout=w.Layout(overflow="auto"))
        self.per_host = w.HTML(layout=w.Layout(overflow="auto"))
        self.temp_power = w.HTML(layout=w.Layout(overflow="auto"))
        self.idle = w.HTML()
        self.idle_title = w.HTML()
        self.xid = w.HTML()
        self.xid_title = w.HTML()
        self.by_namespace_title = w.HTML()
        self.by_namespace = w.HTML()
        controls = [self.host, self.gpu, self.metric, self.window, self.refresh_button]
        if refresh_s > 0:
            controls.append(self.timer)
        self.view = w.VBox([
            self.status, self.error, self.cards,
            w.HBox(controls, layout=w.Layout(flex_flow="row wrap", gap="6px")),
            self.heatmap, self.timeseries, w.HBox([self.per_host, self.temp_power],
                                                  layout=w.Layout(flex_flow="row wrap", gap="24px")),
            self.idle_title, self.idle, self.xid_title, self.xid, self.by_namespace_title, self.by_namespace,
        ])
        self.refresh_button.on_click(lambda _: self.refresh(reload=True))
        self.timer.observe(lambda _: self.refresh(reload=True), names="value")
        self.window.observe(lambda _: self.refresh(reload=True), names="value")
        self.host.observe(self._host_changed, names="value")
        self.gpu.observe(lambda _: self.refresh(reload=False), names="value")
        self.metric.observe(lambda _: self.refresh(reload=False), names="value")

    # -- data ----------------------------------------------------------------------------------
    def load(self) -> dict:
        if self.metric_names is None or self.refreshes % FULL_RELOAD_EVERY == 0:  # names rarely change
            self.metric_names = sorted(m.name for m in self.client.metrics())
        inventory = self.client.gpus()
        start, end = self.ex.resolve_window(inventory, window=self.window.value)
        with ThreadPoolExecutor(max_workers=2) as pool:  # the side panels load while the charts' data does
            events = pool.submit(self.client.events, kind="xid", start_time=start, end_time=end)
            usage = pool.submit(self.client.usage, "namespace", start_time=start, end_time=end,
                                idle_threshold=self.idle_threshold)
            full = self.refreshes % FULL_RELOAD_EVERY == 0  # now and then everything, for rows that came late
            loaded = self.ex.load_window(self.client, start_time=start, end_time=end, target_buckets=60,
                                         max_elements=MAX_ELEMENTS, gpus=inventory,
                                         metrics=[self.metric.value, *self.ex.CHART_METRICS],
                                         known_metrics=self.metric_names, previous=None if full else self.loaded)
            loaded["events"], loaded["usage"] = events.result(), usage.result()
        return loaded

    def _host_changed(self, _change) -> None:
        self._set_gpu_options()
        self.refresh(reload=False)

    def _set_gpu_options(self) -> None:
        if self.loaded is None:
            return
        host = self.host.value
        gpus = [g for g in self.loaded["gpus"] if not host or g.hostname == host]
        label = self.ex.gpu_label
        options = [("All GPUs", "")] + [(f"{label(g.hostname, g.gpu_index, g.mig_instance)}  {g.uuid[:12]}…", g.uuid)
                                         for g in gpus]
        _set_options(self.gpu, options, self.gpu.value)

    def _set_pickers(self) -> None:
        hosts = sorted({g.hostname for g in self.loaded["gpus"]})
        _set_options(self.host, [("All hosts", "")] + [(h, h) for h in hosts], self.host.value)
        metrics = self.metric_names or [self.ex.UTIL]
        _set_options(self.metric, [(self.ex.short(m), m) for m in metrics], self.metric.value)
        self._set_gpu_options()

    # -- rendering -----------------------------------------------------------------------------
    def refresh(self, reload: bool = True) -> None:
        """Reload from the API (or just re-draw for a new selection) and render; errors show as a banner."""
        if self._busy:
            return
        self._busy = True
        started = time.monotonic()
        try:
            if reload or self.loaded is None or self.metric.value not in self.loaded["metrics"]:
                self.loaded = self.load()
                self._set_pickers()
            self.render()
            self.error.value = ""
            self.refreshes += 1
            stamp = datetime.now(UTC).strftime("%H:%M:%S")
            auto = f"; auto-refresh every {self.refresh_s}s" if self.refresh_s > 0 else ""
            self.status.value = (f'<span class="tnb-status">API {html.escape(self.api_url)} · updated {stamp} UTC '
                                 f"in {time.monotonic() - started:.1f}s{auto}</span>")
        except Exception as err:  # noqa: BLE001 (shown on the page, the dashboard keeps running)
            self.errors.append(traceback.format_exc())
            self.error.value = (f'<div class="tnb-error">Could not refresh from {html.escape(self.api_url)}: '
                                f"{html.escape(type(err).__name__)}: {html.escape(str(err))}</div>")
        finally:
            self._busy = False

    def render(self) -> None:
        """Charts first (their SVGs render in worker processes meanwhile), then the cards and tables."""
        ex, loaded = self.ex, self.loaded
        df = loaded["data"]
        host, uuid, metric = self.host.value, self.gpu.value, self.metric.value
        scoped = df[df["hostname"] == host] if host else df
        scoped.attrs.update(df.attrs)
        where = host or "all hosts"
        per_host = scoped["uuid"].nunique() > FLEET_ROWS
        svgs = []
        heatmap = ex.utilization_heatmap(scoped, metric, max_rows=3000, width=820, max_height=400,
                                         by="hostname" if per_host else "gpu")
        svgs.append((self.heatmap, self.svg.submit(heatmap.properties(
            title=f"{ex.short(metric)} per {'host' if per_host else 'GPU'} over time — {where}"))))
        if uuid:
            one = scoped[scoped["uuid"] == uuid]
            one.attrs.update(df.attrs)
            ts = ex.metric_timeseries(one, metric, by="gpu", width=820)
        else:  # one host: a line per GPU; the fleet: a line per host
            ts = ex.metric_timeseries(scoped, metric, by="gpu" if host else "hostname", width=820)
        svgs.append((self.timeseries, self.svg.submit(ts)))
        svgs.append((self.per_host, self.svg.submit(ex.utilization_per_host(df, lines=False, max_hosts=BAR_HOSTS))))
        svgs.append((self.temp_power, self.svg.submit(ex.temperature_vs_power(scoped, max_rows=2000, width=380)
                                                      .properties(title=f"Temperature vs power — {where}"))))
        idle_all = ex.idle_gpus(df, self.idle_threshold)
        s = ex.fleet_summary(loaded, idle_threshold=self.idle_threshold, idle=idle_all)
        util_now = "–" if s["utilization_now"] is None else f"{s['utilization_now']:.0f}%"
        window = f"{loaded['start']:%H:%M}–{loaded['end']:%H:%M} UTC"
        self.cards.value = _cards([("GPUs reporting", f"{s['reporting_gpus']} / {s['gpus']}"),
                                   ("hosts reporting", f"{s['reporting_hosts']} / {s['hosts']}"),
                                   ("utilization now", util_now), ("idle GPUs", str(s["idle_gpus"])),
                                   ("window", window)])
        idle = ex.idle_gpus(scoped, self.idle_threshold) if host else idle_all
        self.idle_title.value = (f"<h4>Idle GPUs — {html.escape(where)}: {len(idle)} under "
                                 f"{self.idle_threshold:g}% utilization for the whole window</h4>")
        self.idle.value = _table(idle[["gpu", "uuid", "max_util", "avg_power_w", "avg_fb_used_mib"]])
        xid = ex.xid_gpus(loaded.get("events", []), loaded["gpus"], host or None)
        self.xid_title.value = f"<h4>GPUs with XID errors in the window — {html.escape(where)}: {len(xid)}</h4>"
        self.xid.value = _table(xid)
        self.render_by_namespace()
        for widget, pending in svgs:
            widget.value = pending.result()

    def render_by_namespace(self) -> None:
        """The "By namespace" panel: GPU-hours and idle share per namespace over the window (whole fleet)."""
        from telemetry_nb.analysis import accounting

        report = self.loaded.get("usage")
        if report is None:
            return
        df = accounting.usage_frame(report)
        totals = accounting.summary(report, df)
        self.by_namespace_title.value = (
            f"<h4>By namespace — {totals['gpu_hours']:.1f} GPU-hours, {totals['idle_share']:.0%} idle, "
            f"{totals['unattributed_share']:.0%} unattributed</h4>")
        table = df.rename(columns={"group": "namespace"})[["namespace", "gpus", "gpu_hours", "idle_gpu_hours",
                                                           "idle_share", "avg_util"]].copy()
        table["idle_share"] = 100 * table["idle_share"]
        self.by_namespace.value = _table(table.rename(columns={"idle_share": "idle %", "avg_util": "avg util %"}))

    def show(self):
        """Display the app and draw it once; the Play widget then drives the periodic refresh."""
        from IPython.display import display

        display(self.view)
        self.refresh(reload=True)
        if self.refresh_s > 0:
            self.timer.playing = True
        return self
