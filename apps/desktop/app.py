"""A desktop example on the Python API: open an image, pick a task, see the answer and the
boxes/masks drawn, Stop a long generation. Tk from the standard library (macOS and Linux).

    python -m apps.desktop [MODEL] [--image cat.jpg]      # MODEL defaults to the built-in demo

The model runs in a background thread (the UI never blocks); results come back to the Tk
thread through a queue polled with `after`, since Tk may only be touched from its own thread.
caption/ask stream their text as it arrives; detect/segment show the parsed objects drawn on
the image. Stop calls `stream.cancel()` / `pg.cancel()` (pg_edge/worker.py).
"""
from __future__ import annotations

import base64
import dataclasses
import io
import queue
import threading
import time
import tkinter as tk
from tkinter import filedialog

import numpy as np
from PIL import Image

from apps.desktop import DEFAULT_TEXT, MAX_TOKENS
from pg_edge.tasks import parse, prompts
from pg_edge.tasks.draw import draw_objects
from pg_edge.inputs.images import load_image, to_rgb

TASKS = ("caption", "ask", "detect", "segment")
HINTS = {"caption": "language (en, de, ...)", "ask": "question", "detect": "objects: cat ; dog",
         "segment": "objects: cat ; dog"}

CANVAS = (512, 384)  # the image is scaled to fit, never up


def fit(size: tuple[int, int], box: tuple[int, int] = CANVAS) -> float:
    """Scale that fits `size` (w, h) inside `box`, at most 1."""
    return min(1.0, box[0] / size[0], box[1] / size[1])


def rendered(image: Image.Image, result=None) -> Image.Image:
    """The image scaled for the canvas with the result's boxes and masks drawn at that scale
    (drawing after scaling keeps the outlines crisp)."""
    s = fit(image.size)
    size = (max(1, round(image.width * s)), max(1, round(image.height * s)))
    small = to_rgb(image).resize(size, Image.Resampling.BILINEAR)
    if result is None or not result.objects:
        return small
    objects = []
    for obj in result.objects:
        mask = obj.mask
        if mask is not None:
            mask = np.asarray(Image.fromarray(mask).resize(size, Image.Resampling.NEAREST))
        objects.append(dataclasses.replace(obj, box=tuple(v * s for v in obj.box), mask=mask))
    return draw_objects(small, objects)


def photo(image: Image.Image) -> tk.PhotoImage:
    """PIL image -> Tk image via PNG (Tk 8.6 reads PNG itself; no ImageTk needed)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return tk.PhotoImage(data=base64.b64encode(buf.getvalue()).decode())


class App:
    """The window. `pg`: a loaded PaliGemma (or None and `model`: loaded in the background, with
    `adapters`, a `pg-edge finetune` adapters folder, applied when given)."""

    def __init__(self, root: tk.Tk, pg=None, model: str | None = None, image=None,
                 gen: dict | None = None, vae=None, adapters=None, defaults: dict | None = None):
        """`defaults`: the text field's content per task (DEFAULT_TEXT; DEMO_TEXT for the demo)."""
        self.root, self.pg, self.gen, self.vae = root, pg, gen or {"max_tokens": MAX_TOKENS}, vae
        self.adapters = adapters
        self.defaults = defaults or DEFAULT_TEXT
        self.image: Image.Image | None = None
        self.result = None  # the last TaskResult (detect/segment) or text (caption/ask)
        self.busy = False
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._stream = None
        self._photo = None
        root.title("pg_edge")
        self._build()
        if image is not None:
            self.open_image(image)
        if pg is None and model is not None:
            self._set_status(f"loading {model} ...")
            threading.Thread(target=self._load, args=(model,), daemon=True).start()
        root.after(30, self._poll)

    # -- layout --------------------------------------------------------------------------
    def _build(self) -> None:
        bar = tk.Frame(self.root)
        bar.pack(side=tk.TOP, fill=tk.X, padx=6, pady=4)
        self.open_button = tk.Button(bar, text="Open image...", command=self.choose_image)
        self.open_button.pack(side=tk.LEFT)
        self.task = tk.StringVar(value="caption")
        self.task_buttons = {}
        for name in TASKS:
            b = tk.Radiobutton(bar, text=name, value=name, variable=self.task, command=self._task_changed)
            b.pack(side=tk.LEFT)
            self.task_buttons[name] = b
        self.run_button = tk.Button(bar, text="Run", command=self.run_task)
        self.run_button.pack(side=tk.LEFT, padx=(8, 0))
        self.stop_button = tk.Button(bar, text="Stop", command=self.stop, state=tk.DISABLED)
        self.stop_button.pack(side=tk.LEFT)

        line = tk.Frame(self.root)
        line.pack(side=tk.TOP, fill=tk.X, padx=6)
        self.hint = tk.Label(line, text=HINTS["caption"], width=20, anchor="w")
        self.hint.pack(side=tk.LEFT)
        self.text_var = tk.StringVar(value=self.defaults["caption"])
        self.entry = tk.Entry(line, textvariable=self.text_var)
        self.entry.pack(side=tk.LEFT, fill=tk.X, expand=True)
        self.entry.bind("<Return>", lambda _e: self.run_task())

        self.canvas = tk.Canvas(self.root, width=CANVAS[0], height=CANVAS[1], background="#202020",
                                highlightthickness=0)
        self.canvas.pack(side=tk.TOP, padx=6, pady=4)
        self.answer = tk.Text(self.root, height=5, width=70, wrap="word")
        self.answer.pack(side=tk.TOP, fill=tk.X, padx=6)
        self.status = tk.Label(self.root, text="open an image", anchor="w")
        self.status.pack(side=tk.TOP, fill=tk.X, padx=6, pady=(0, 4))

    def _task_changed(self) -> None:
        task = self.task.get()
        self.hint.config(text=HINTS[task])
        self.text_var.set(self.defaults[task])

    def _set_status(self, text: str) -> None:
        self.status.config(text=text)

    def _set_answer(self, text: str, append: bool = False) -> None:
        if not append:
            self.answer.delete("1.0", tk.END)
        self.answer.insert(tk.END, text)

    def _show(self, result=None) -> None:
        if self.image is None:
            return
        self._photo = photo(rendered(self.image, result))
        self.canvas.delete("all")
        self.canvas.create_image(0, 0, anchor="nw", image=self._photo)

    # -- actions -------------------------------------------------------------------------
    def choose_image(self) -> None:
        path = filedialog.askopenfilename(title="Open image", filetypes=[
            ("Images", "*.png *.jpg *.jpeg *.webp *.bmp *.gif *.tif *.tiff"), ("All files", "*")])
        if path:
            self.open_image(path)

    def open_image(self, image) -> None:
        try:
            self.image = load_image(image)
            self.image.load()
        except Exception as err:  # a bad file is reported in the window, not raised
            self._set_status(f"cannot open image: {err}")
            return
        self.result = None
        self._set_answer("")
        self._show()
        self._set_status(f"image {self.image.width}x{self.image.height}")

    def run_task(self) -> None:
        if self.busy or self.image is None or self.pg is None:
            self._set_status("open an image first" if self.image is None else
                             "busy" if self.busy else "the model is still loading")
            return
        task, text, image = self.task.get(), self.text_var.get(), self.image
        self.busy = True
        self.run_button.config(state=tk.DISABLED)
        self.stop_button.config(state=tk.NORMAL)
        self._set_answer("")
        self._show()
        self._set_status(f"{task} ...")
        threading.Thread(target=self._work, args=(task, text, image), daemon=True).start()

    def stop(self) -> None:
        if not self.busy:
            return
        if self._stream is not None:
            self._stream.cancel()
        else:
            self.pg.cancel()
        self._set_status("stopping ...")

    # -- background thread -> Tk thread --------------------------------------------------
    def _load(self, model: str) -> None:
        import pg_edge

        try:
            self._events.put(("loaded", pg_edge.load(model, adapters=self.adapters)))
        except Exception as err:
            self._events.put(("error", f"cannot load {model}: {err}"))

    def _work(self, task: str, text: str, image) -> None:
        t0 = time.perf_counter()
        try:
            if task in ("caption", "ask"):
                prompt = prompts.caption(text.strip() or "en") if task == "caption" else prompts.answer(text)
                self._stream = self.pg.stream(image, prompt, **self.gen)
                for chunk in self._stream:
                    if chunk.text:
                        self._events.put(("piece", chunk.text))
                    if chunk.result is not None:
                        clean = parse.clean_output(chunk.result.text, prompt)
                        self._events.put(("text", clean, chunk.result.finish_reason, time.perf_counter() - t0))
            elif task == "detect":
                r = self.pg.detect(image, text, **self.gen)
                self._events.put(("objects", r, time.perf_counter() - t0))
            else:
                r = self.pg.segment(image, text, vae=self.vae, **self.gen)
                self._events.put(("objects", r, time.perf_counter() - t0))
        except Exception as err:  # shown in the status line; the app keeps running
            self._events.put(("error", str(err)))
        finally:
            self._stream = None

    def _poll(self) -> None:
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                break
            self._handle(*event)
        self.root.after(30, self._poll)

    def _handle(self, kind: str, *args) -> None:
        if kind == "loaded":
            self.pg = args[0]
            self._set_status("model loaded" + ("" if self.image is not None else "; open an image"))
            return
        if kind == "piece":
            self._set_answer(args[0], append=True)
            return
        self.busy = False
        self.run_button.config(state=tk.NORMAL)
        self.stop_button.config(state=tk.DISABLED)
        if kind == "error":
            self._set_status(f"error: {args[0]}")
        elif kind == "text":
            text, finish, seconds = args
            self.result = text
            self._set_answer(text)
            self._set_status(f"{'stopped' if finish == 'cancelled' else 'done'} in {seconds:.1f} s")
        elif kind == "objects":
            result, seconds = args
            self.result = result
            self._show(result)
            box = lambda o: f"[{', '.join(f'{v:.0f}' for v in o.box)}]"
            lines = [f"{o.label or '(no label)'}  {box(o)}" for o in result.objects] or ["(nothing found)"]
            lines += [f"not asked for: {o.label or '(no label)'}  {box(o)}" for o in result.unmatched]
            self._set_answer("\n".join(lines))
            stopped = result.generation.finish_reason == "cancelled"
            cut = (f"; cut off at {self.gen.get('max_tokens')} tokens, objects may be missing "
                   "(raise --max-tokens)" if result.truncated else "")
            self._set_status(f"{'stopped' if stopped else 'done'} in {seconds:.1f} s: "
                             f"{len(result.objects)} object(s){cut}")
