"""PaliGemma's tasks: the prompts, reading the answers, and the tasks as calls on a loaded model.

    prompts.py       the task prompts in the official forms (caption, ocr, answer, detect, ...)
    parse.py         generated text -> cleaned text, boxes and mask codes (the <loc>/<seg> grammar)
    calls.py         the tasks on a loaded PaliGemma: caption, ocr, ask, detect, segment; to_json
    draw.py          boxes and masks drawn on the image
    label.py         `pg-edge label`: a folder of images -> a labels file, resumable
    explain.py       `pg-edge explain`: one generation stage by stage (explain_draw.py: its report
                     and pictures)
"""
