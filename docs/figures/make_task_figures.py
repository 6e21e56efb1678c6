"""Draw the README's figures from the built-in demo model's real output (run:
`python docs/figures/make_task_figures.py`).

    demo_segment.png   what `make demo` writes for the third sample (apps/demo.py's drawing)
    detect_shapes.png  `pg-edge detect demo --image shapes_2.png "circle ; square ; triangle" -o ...`
    segment_shapes.png `pg-edge segment demo --image shapes_3.png "circle ; square ; triangle" -o ...`

Every box and mask comes from generating with the shipped quantized `demo` model, parsed and
drawn by the code the commands use; the script prints the raw outputs it drew.
"""
from pathlib import Path

import pg_edge
from apps.demo import OBJECTS, annotate
from pg_edge import demo
from pg_edge import model_tasks
from pg_edge.processor import load_image

HERE = Path(__file__).parent


def main() -> None:
    pg = pg_edge.load("demo")
    decoder = model_tasks.find_vae(pg)
    s2, s3 = demo.SAMPLES[1], demo.SAMPLES[2]

    cap, count = pg.caption(s3), pg.ask(s3, "how many shapes?")
    seg3 = pg.segment(s3, OBJECTS, vae=decoder)
    lines = [f"caption: {cap.text}", f"shapes: {count.text}"]
    annotate(load_image(s3), seg3.text, lines, decoder).save(HERE / "demo_segment.png")
    print(f"{s3.name}: {cap.text!r}, {count.text!r}\n  {seg3.text}")

    det = pg.detect(s2, OBJECTS)
    model_tasks.draw(det, s2).save(HERE / "detect_shapes.png")
    print(f"{s2.name}: {det.text}")
    model_tasks.draw(seg3, s3).save(HERE / "segment_shapes.png")


if __name__ == "__main__":
    main()
