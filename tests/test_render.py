"""Tests of opt.render, opt.render_text and opt.render_html."""

import base64
import fcntl
import json
import os
import pathlib
import re
import select
import shutil
import struct
import subprocess
import time
import warnings

import optax
import pytest
import treescope
from flax import nnx

from ueaj import opt
from ueaj.opt import _render
from ueaj.opt._render import compact_labels

GOLDEN = pathlib.Path(__file__).parent / "golden" / "render_text.txt"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
]

# Copies what treescope drew inside its shadow root into the page, where
# --dump-dom can see it: all visible text, and the text of every badge.
PROBE = """<script>
window.addEventListener('load', () => {
  const poll = setInterval(() => {
    const host = document.querySelector('treescope-container');
    const root = host && host.shadowRoot;
    if (!root || !root.querySelector('[style*="--ueaj-opt-badge"]')) return;
    clearInterval(poll);
    const walker = document.createTreeWalker(root, NodeFilter.SHOW_TEXT);
    const pieces = [];
    while (walker.nextNode()) {
      const parent = walker.currentNode.parentElement;
      if (!parent || !['STYLE', 'SCRIPT'].includes(parent.tagName)) {
        pieces.push(walker.currentNode.textContent);
      }
    }
    const text = document.createElement('pre');
    text.id = 'probe-text';
    text.textContent = pieces.join('');
    document.body.appendChild(text);
    const badges = document.createElement('ol');
    badges.id = 'probe-badges';
    for (const badge of root.querySelectorAll('[style*="--ueaj-opt-badge"]')) {
      const item = document.createElement('li');
      item.textContent = badge.textContent;
      badges.appendChild(item);
    }
    document.body.appendChild(badges);
  }, 10);
});
</script>
"""


class Block(nnx.Module):
  def __init__(self, layer_idx, rngs):
    self.layer_idx = layer_idx
    self.attn = nnx.Linear(4, 4, rngs=rngs)
    self.norm = nnx.LayerNorm(4, rngs=rngs)


class Model(nnx.Module):
  def __init__(self, rngs):
    self.embed = nnx.Embed(10, 4, rngs=rngs)
    self.layers = nnx.List([Block(i, rngs) for i in range(3)])
    self.norm = nnx.BatchNorm(4, rngs=rngs)
    self.head = nnx.Linear(4, 2, rngs=rngs)


class Stacked(nnx.Module):
  """Six layers' attention kernels in one Variable, labelled per layer."""

  def __init__(self, rngs):
    self.attn = nnx.Param(rngs.params.uniform((6, 4, 4)))
    self.attn.set_metadata(opt.LABEL_KEY, tuple(f"layers/{i}/attn" for i in range(6)))
    self.café = nnx.Linear(2, 2, rngs=rngs)


def labelled_model():
  model = Model(nnx.Rngs(0))
  mgr = opt.OptimizerManager()
  mgr[...] = optax.adamw(1e-3)
  mgr["layers", :, "attn"] = optax.adam(1e-3)
  mgr["embed"] = None
  mgr["layers", 0] = None
  return model, mgr.label(model)


def test_text_matches_golden():
  model, groups = labelled_model()
  text = opt.render_text(model, groups) + "\n"
  if os.environ.get("UEAJ_UPDATE_GOLDEN"):
    GOLDEN.write_text(text, encoding="utf-8")
  assert text == GOLDEN.read_text(encoding="utf-8"), (
    "render_text changed; if on purpose, rerun with UEAJ_UPDATE_GOLDEN=1"
  )


def test_text_legend_counts():
  model, groups = labelled_model()
  lines = opt.render_text(model, groups).splitlines()
  rows = [re.fullmatch(r"  \[(.*?)\]\s+(.*)", line) for line in lines[1:7]]
  legend = {row.group(1): " ".join(row.group(2).split()) for row in rows}
  assert lines[0] == "Optimizer groups: 5 (2 frozen), 19 Variables, 150 elements"
  assert legend["..."].startswith("8 Variables 34 elements mgr[...] = transform")
  assert legend["layers/1/attn"].startswith("2 Variables 20 elements")
  assert legend["embed: frozen"].startswith("1 Variable 40 elements")
  assert legend["layers/0: frozen"].startswith("4 Variables 28 elements")
  assert legend["unlabelled"].startswith("2 Variables 8 elements")


def test_render_labels_in_group_order():
  model, groups = labelled_model()
  rendering = opt.render(model, groups)
  assert rendering.labels == groups.labels


def test_text_without_groups_reads_labels():
  model, groups = labelled_model()
  text = opt.render_text(model)
  assert "Optimizer groups: 5 (0 frozen)" in text
  assert "embedding=[embed] Param(float32(10, 4))" in text
  assert ": frozen" not in text
  assert "mgr[" not in text


def test_render_accepts_optimizer():
  model = Model(nnx.Rngs(0))
  mgr = opt.OptimizerManager()
  mgr[...] = optax.sgd(0.1)
  mgr["embed"] = None
  optimizer = opt.Optimizer(model, mgr, wrt=nnx.Param)
  assert "[embed: frozen] Param" in opt.render_text(model, optimizer)


def test_module_annotation_counts_groups():
  model, groups = labelled_model()
  lines = opt.render_text(model, groups).splitlines()
  block = next(line for line in lines if line.strip().startswith("1=Block("))
  assert block.strip() == "1=Block(  # [...] ×2, [layers/1/attn] ×2"


def test_stacked_labels_run_length():
  model = Stacked(nnx.Rngs(0))
  model.café.kernel.set_metadata(opt.LABEL_KEY, "café")
  text = opt.render_text(model)
  assert "attn=[layers/0/attn … layers/5/attn] Param(float32(6, 4, 4))" in text
  assert "  [layers/3/attn] 1 Variable   16 elements" in text
  assert "kernel=[café] Param(float32(2, 2))" in text
  assert "bias=[unlabelled] Param(float32(2,))" in text


@pytest.mark.parametrize(
  ("labels", "expected"),
  [
    (["a"], "a"),
    (["a", "a", "a"], "a ×3"),
    (["l/0", "l/1"], "l/0, l/1"),
    (["l/0", "l/1", "l/2", "m", "m"], "l/0 … l/2, m ×2"),
    (["b/0/x/3", "b/1/x/3", "b/2/x/3"], "b/0/x/3 … b/2/x/3"),
    (["l/0", "l/2", "l/4"], "l/0, l/2, l/4"),
    (["l/0/a", "l/1/b", "l/2/c"], "l/0/a, l/1/b, l/2/c"),
  ],
)
def test_compact_labels(labels, expected):
  assert compact_labels(labels) == expected


def test_bad_metadata_warns_and_falls_back():
  model, groups = labelled_model()
  model.head.kernel.set_metadata(opt.LABEL_KEY, 42)
  with pytest.warns(opt.RenderWarning, match="head/kernel.*int 42") as record:
    text = opt.render_text(model, groups)
  assert record[0].filename == __file__
  assert "opt_group=42" in text
  assert "bias=[...] Param(float32(2,))" in text


def test_stacked_length_mismatch_warns():
  model = Stacked(nnx.Rngs(0))
  model.attn.set_metadata(opt.LABEL_KEY, ("a", "b"))
  with pytest.warns(opt.RenderWarning, match="attn: 2 per-layer.*any axis"):
    text = opt.render_text(model)
  assert "Optimizer groups: 0 (0 frozen), 3 Variables (1 not annotated), 6 elements" in text
  assert "opt_group=(\n      'a',\n      'b',\n    )," in text


def test_rendering_warns_once_per_problem():
  model, groups = labelled_model()
  model.head.kernel.set_metadata(opt.LABEL_KEY, 42)
  with pytest.warns(opt.RenderWarning) as record:
    rendering = opt.render(model, groups)
    rendering.to_text()
    rendering._repr_html_()
  assert len(record) == 1


def test_other_objects_render_unchanged():
  model, groups = labelled_model()
  before_renderer = treescope.active_renderer.get()
  before = treescope.render_to_text(model)
  opt.render_text(model, groups)
  opt.render_html(model, groups)
  assert treescope.active_renderer.get() is before_renderer
  assert treescope.render_to_text(model) == before
  assert "[...]" not in before


def test_shared_module_shown_once():
  model, groups = labelled_model()
  model.tied = model.head
  text = opt.render_text(model, groups)
  assert "tied=<same object as head>" in text
  assert text.count("kernel=[...] Param(float32(4, 2))") == 1


def test_invalid_groups_type():
  model, _ = labelled_model()
  with pytest.raises(TypeError, match="got dict"):
    opt.render(model, {"...": None})


def test_repr_html_is_fragment():
  model, groups = labelled_model()
  fragment = opt.render(model, groups)._repr_html_()
  assert "treescope-container" in fragment
  assert "<!DOCTYPE" not in fragment


def test_html_document():
  model, groups = labelled_model()
  page = opt.render_html(model, groups, title="a <b> & c")
  assert page.startswith("<!DOCTYPE html>\n<html")
  assert '<meta charset="utf-8">' in page
  assert "<title>a &lt;b&gt; &amp; c</title>" in page
  assert page.rstrip().endswith("</html>")


class HeadlessChromium:
  """Headless Chromium driven over the DevTools protocol on a pipe.

  `--dump-dom` with a virtual-time budget raced treescope's asynchronous
  decompression and missed the drawing in one of two to one of six runs on
  a 2-core machine. Waiting for the probe over the protocol takes real
  time and has no race.
  Chromium reads NUL-terminated JSON commands from fd 3 and writes replies
  and events to fd 4.
  """

  def __init__(self, profile: pathlib.Path, timeout: float = 60.0):
    command_read, self._commands = os.pipe()
    self._replies, reply_write = os.pipe()
    # Move the child's ends above 9, so that the redirections below never
    # close a descriptor they have just filled.
    command_read = _move_above_nine(command_read)
    reply_write = _move_above_nine(reply_write)
    # Bash moves the pipe ends to fds 3 and 4 before it runs Chromium (dash
    # accepts only one-digit descriptors in redirections).
    # A preexec_fn could do that too, but it makes subprocess call os.fork,
    # which JAX warns about.
    redirect = f'exec "$0" "$@" 3<&{command_read} 4>&{reply_write} {command_read}<&- {reply_write}>&-'
    self._process = subprocess.Popen(
      [
        "/bin/bash", "-c", redirect,
        CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-pipe",
      ],
      stdin=subprocess.DEVNULL,
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
      pass_fds=(command_read, reply_write),
    )
    os.close(command_read)
    os.close(reply_write)
    self._timeout = timeout
    self._deadline = time.monotonic() + timeout
    self._buffer = b""
    self._events = []
    self._last_id = 0

  def send(self, method: str, session: str | None = None, **params):
    """Send one command and return its result; events that arrive meanwhile are kept."""
    self._last_id += 1
    message = {"id": self._last_id, "method": method, "params": params}
    if session is not None:
      message["sessionId"] = session
    os.write(self._commands, json.dumps(message).encode() + b"\0")
    while True:
      reply = self._read()
      if reply.get("id") == self._last_id:
        assert "error" not in reply, f"{method} failed: {reply['error']}"
        return reply["result"]
      if "method" in reply:
        self._events.append(reply)

  def wait_for(self, method: str, session: str) -> dict:
    """Return the parameters of the next event `method` of `session`."""
    while True:
      for event in self._events:
        if event["method"] == method and event.get("sessionId") == session:
          self._events.remove(event)
          return event["params"]
      reply = self._read()
      if "method" in reply:
        self._events.append(reply)

  def open(self, url: str, width: int, height: int) -> str:
    """Load `url` in a new page of `width` x `height` CSS pixels; return its session."""
    target = self.send("Target.createTarget", url="about:blank")["targetId"]
    session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
    self.send("Page.enable", session)
    self.send(
      "Emulation.setDeviceMetricsOverride",
      session,
      width=width,
      height=height,
      deviceScaleFactor=1,
      mobile=False,
    )
    self.send("Page.navigate", session, url=url)
    self.wait_for("Page.loadEventFired", session)
    return session

  def close(self) -> None:
    try:
      self.send("Browser.close")
    finally:
      self._process.wait(timeout=30)
      self._process.stderr.close()
      os.close(self._commands)
      os.close(self._replies)

  def _read(self) -> dict:
    while b"\0" not in self._buffer:
      remaining = self._deadline - time.monotonic()
      readable, _, _ = select.select([self._replies], [], [], max(remaining, 0.0))
      if not readable:
        self._process.kill()
        raise TimeoutError(
          f"No reply from Chromium within {self._timeout} s: the page may not have loaded,"
          " or treescope may not have drawn the badges the probe waits for."
        )
      chunk = os.read(self._replies, 1 << 16)
      if not chunk:
        raise RuntimeError("Chromium exited: " + self._process.stderr.read().decode()[-2000:])
      self._buffer += chunk
    message, self._buffer = self._buffer.split(b"\0", 1)
    return json.loads(message)


def _move_above_nine(descriptor: int) -> int:
  moved = fcntl.fcntl(descriptor, fcntl.F_DUPFD_CLOEXEC, 10)
  os.close(descriptor)
  return moved


# Resolves with the page's HTML once the probe has copied the drawing.
AFTER_PROBE = """new Promise(resolve => {
  const check = () => document.getElementById('probe-badges')
    ? resolve(document.documentElement.outerHTML)
    : setTimeout(check, 20);
  check();
})"""


@pytest.mark.skipif(
  shutil.which(CHROMIUM) is None, reason=f"{CHROMIUM} is not installed (apt-get install chromium)"
)
def test_html_in_headless_chromium(tmp_path):
  model, groups = labelled_model()
  model.stack = Stacked(nnx.Rngs(1))
  model.stack.café.kernel.set_metadata(opt.LABEL_KEY, "café")
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    page = opt.render_html(model, groups)
  page_file = tmp_path / "model.html"
  page_file.write_text(page.replace("</body>", PROBE + "</body>"), encoding="utf-8")

  browser = HeadlessChromium(tmp_path / "profile")
  try:
    session = browser.open(page_file.as_uri(), width=1000, height=1200)
    evaluated = browser.send(
      "Runtime.evaluate", session, expression=AFTER_PROBE, awaitPromise=True, returnByValue=True
    )
    dom = evaluated["result"]["value"]
    screenshot = base64.b64decode(browser.send("Page.captureScreenshot", session, format="png")["data"])
  finally:
    browser.close()

  text = re.search(r'<pre id="probe-text">(.*?)</pre>', dom, re.S)
  assert text is not None, "treescope drew nothing: " + dom[-2000:]
  badges = re.findall(r"<li>(.*?)</li>", dom)
  assert "Optimizer groups: 10 (2 frozen), 22 Variables, 252 elements" in text.group(1)
  for label in ["...", "layers/1/attn", "layers/2/attn", "embed: frozen", "layers/0: frozen", "unlabelled"]:
    assert label in badges
  # Non-ASCII text survives the compression, the base64 and the decoding.
  assert "layers/0/attn … layers/5/attn" in badges
  assert "café" in badges
  assert badges.count("layers/0: frozen") >= 5  # the legend and four Variables

  assert screenshot[:8] == b"\x89PNG\r\n\x1a\n"
  width, height = struct.unpack(">II", screenshot[16:24])
  assert (width, height) == (1000, 1200)
  assert len(screenshot) > 20_000, "the screenshot is nearly empty"


class ScannedBlock(nnx.Module):
  def __init__(self, rngs):
    self.attn = nnx.Linear(2, 2, rngs=rngs)


class Scanned(nnx.Module):
  def __init__(self, rngs):
    @nnx.split_rngs(splits=6)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
      return ScannedBlock(rngs)

    self.layers = create(rngs)


def test_declared_stack_with_groups():
  model = Scanned(nnx.Rngs(0))
  mgr = opt.OptimizerManager()
  mgr.declare_stack("layers")
  mgr[...] = optax.adam(1e-3)
  mgr["layers", 1:, "attn"] = optax.sgd(0.1)
  mgr["layers", 0] = None
  text = opt.render_text(model, mgr.label(model))
  assert "kernel=[layers/0, layers/1/attn … layers/5/attn: 1/6 frozen] Param(float32(6, 2, 2))" in text
  assert "  [layers/0: frozen] 2 Variables  6 elements  mgr['layers', 0] = frozen" in text
  assert "  [layers/4/attn]    2 Variables  6 elements" in text


def test_handler_error_falls_back(monkeypatch):
  model, groups = labelled_model()

  def fail(self, variable, leaf, path):
    if leaf.path == ("head", "kernel"):
      raise RuntimeError("broken on purpose")
    return original(self, variable, leaf, path)

  original = _render._Annotator._render_variable
  monkeypatch.setattr(_render._Annotator, "_render_variable", fail)
  for function in (opt.render_text, opt.render_html):
    with pytest.warns(opt.RenderWarning, match="head/kernel: RuntimeError: broken on purpose") as record:
      output = function(model, groups)
    assert record[0].filename == __file__
    assert output
  with pytest.warns(opt.RenderWarning):
    text = opt.render_text(model, groups)
  # Treescope's own rendering of the Variable shows the label as an attribute.
  assert "opt_group='...'" in text
