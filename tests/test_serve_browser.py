"""The web page in a real headless browser (Chromium from Debian's packages, driven by
Selenium): it loads, an uploaded image and a question give the API's top answer, a file
that is not an image shows an error. Skipped, saying why, where Chromium is not installed
(``.ci/run`` installs it: ``apt-get install chromium chromium-driver``)."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from mmpeft.cli import app as cli
from tests import tiny

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install -e '.[dev]')")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="Chromium and chromedriver are not installed "
                                "(apt-get install chromium chromium-driver)")


@contextmanager
def served(bundle: Path):
    """``mmpeft serve bundle`` on a free port and a headless browser: ``(driver, url)``; both
    are stopped afterwards, whatever the test did."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "mmpeft.cli", "serve", str(bundle), "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        for _ in range(120):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        else:
            server.kill()
            raise AssertionError("the server did not start: " + server.stdout.read())
        driver = browser()
        try:
            yield driver, f"http://127.0.0.1:{port}/"
        finally:
            driver.quit()
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=30)


def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1100,1250"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(DRIVER), options=options)


def ask(driver, url: str, image: Path, question: str) -> str:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "bundle").text.strip())
    driver.find_element(By.ID, "file").send_keys(str(image))
    question_box = driver.find_element(By.ID, "question")
    question_box.clear()
    question_box.send_keys(question)
    driver.find_element(By.ID, "ask").click()
    WebDriverWait(driver, 60).until(lambda d: d.find_element(By.ID, "answer").text or d.find_element(By.ID, "error").text)
    WebDriverWait(driver, 5).until(ready.presence_of_element_located((By.ID, "bars")))
    return driver.find_element(By.ID, "answer").text, driver.find_element(By.ID, "error").text


def test_page_answers_like_the_api_and_shows_errors(assets, tmp_path):
    raw = tiny.recipe_dict(assets["bert"], assets["vit"], assets["data"], tmp_path, epochs=2)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    assert CliRunner().invoke(cli, ["finetune", str(tmp_path / "r.yaml")]).exit_code == 0
    with served(tmp_path / "tiny") as (driver, url):
        image = sorted((Path(assets["data"]["test"]).parent / "images").glob("test_*.png"))[0]
        api = httpx.post(url + "predict", files={"image": ("x.png", image.read_bytes())},
                         data={"question": "what color is the shape ?"}).json()
        answer, error = ask(driver, url, image, "what color is the shape ?")
        assert answer == api["answer"] and not error
        bars = driver.find_elements("css selector", "#bars .bar")
        assert len(bars) == 3 and api["top_k"][0]["answer"] in bars[0].text
        not_an_image = tmp_path / "notes.txt"
        not_an_image.write_text("not an image")
        answer, error = ask(driver, url, not_an_image, "what color is the shape ?")
        assert not answer and "not an image file" in error


def test_page_asks_an_audio_bundle_for_a_clip_only(assets, tmp_path):
    """An audio-only bundle: the page hides the image and question inputs, takes a clip, and
    answers as the API does; a file that is not audio shows the server's error."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.test_audio import audio_only_recipe

    assert CliRunner().invoke(cli, ["finetune", str(audio_only_recipe(assets, tmp_path))]).exit_code == 0
    with served(tmp_path / "out" / "audio_only") as (driver, url):
        clip = Path(assets["audio_data"]["test"]).parent / "audio" / "test_0.wav"
        api = httpx.post(url + "predict", files={"audio": ("x.wav", clip.read_bytes())}).json()
        driver.get(url)
        WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "bundle").text.strip())
        assert not driver.find_element(By.ID, "drop").is_displayed() and not driver.find_element(By.ID, "question").is_displayed()
        driver.find_element(By.ID, "ask").click()
        WebDriverWait(driver, 10).until(lambda d: d.find_element(By.ID, "error").text)
        assert "choose an audio clip first" in driver.find_element(By.ID, "error").text
        for upload, says in ((clip, ""), (tmp_path / "audio.yaml", "not an audio file")):
            driver.find_element(By.ID, "audio").send_keys(str(upload))
            driver.find_element(By.ID, "ask").click()
            WebDriverWait(driver, 60).until(lambda d: d.find_element(By.ID, "answer").text or d.find_element(By.ID, "error").text)
            if says:
                assert says in driver.find_element(By.ID, "error").text
            else:
                assert driver.find_element(By.ID, "answer").text == api["answer"]


def test_page_asks_for_each_encoders_own_input(assets, tmp_path):
    """A bundle whose encoders read columns of their own (a prior scan, a note): the page shows a
    field for each, refuses to ask without them, and answers as the API does with them."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.test_encoder_fields import make_pairs

    files = make_pairs(tmp_path / "data", n_train=16, n_test=4)
    raw = tiny.recipe_dict(assets["bert"], assets["vit"], files, tmp_path, epochs=1)
    raw["encoders"]["prior"] = {"model": str(assets["vit"]), "peft": {"method": "lora"}}
    raw["encoders"]["note"] = {"model": str(assets["bert"]), "max_length": 8, "peft": {"method": "bitfit"}}
    raw["data"]["encoder_fields"] = {"prior": "prior_image", "note": "note"}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    assert CliRunner().invoke(cli, ["finetune", str(tmp_path / "r.yaml")]).exit_code == 0
    with served(tmp_path / "tiny") as (driver, url):
        now, prior = tmp_path / "data/images/test_0.png", tmp_path / "data/images/test_0_prior.png"
        api = httpx.post(url + "predict", files={"image": ("a.png", now.read_bytes()), "input.prior": ("b.png", prior.read_bytes())},
                         data={"question": "did the colour change ?", "input.note": "new patient", "top_k": "2"}).json()
        driver.get(url)
        WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "bundle").text.strip())
        assert "prior (image)" in driver.find_element(By.ID, "own-inputs").text
        topk = driver.find_element(By.ID, "topk")  # two answers: no more than two to show
        assert [o.text for o in topk.find_elements(By.TAG_NAME, "option")] == ["1", "2"] and topk.get_attribute("value") == "2"
        driver.find_element(By.ID, "file").send_keys(str(now))
        driver.find_element(By.ID, "question").send_keys("did the colour change ?")
        driver.find_element(By.ID, "ask").click()
        WebDriverWait(driver, 10).until(lambda d: d.find_element(By.ID, "error").text or d.find_element(By.ID, "answer").text)
        assert "give note's text first" in driver.find_element(By.ID, "error").text
        driver.find_element(By.ID, "own-note").send_keys("new patient")
        driver.find_element(By.ID, "own-prior").send_keys(str(prior))
        driver.find_element(By.ID, "ask").click()
        # an outcome: the answer, or another error (the old one is cleared while the request runs)
        WebDriverWait(driver, 60).until(lambda d: d.find_element(By.ID, "answer").text or
                                        "first" not in (d.find_element(By.ID, "error").text or "first"))
        assert driver.find_element(By.ID, "answer").text == api["answer"] and not driver.find_element(By.ID, "error").text


def test_page_streams_a_generating_bundles_reply(assets, tmp_path):
    """A captioning bundle: the page shows a prompt box and the reply length instead of answer
    bars, sends the chat API a streamed request, shows the text piece by piece as it arrives
    (more than one partial text seen), ending in ``predict``'s greedy text; a file that is not
    an image shows the server's OpenAI-shaped error."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from mmpeft.inference import Predictor
    from tests.test_generate import trained
    from tests.test_tasks import write_rows

    rows = write_rows(tmp_path / "rows")
    bundle = trained(assets, rows, tmp_path, epochs=2, prompt="describe: {}", max_new_tokens=6)
    image = rows["test"].parent / "images/test_0.png"
    want = Predictor(bundle).predict([str(image)], ["what color is the shape ?"])[0]["text"]
    with served(bundle) as (driver, url):
        driver.get(url)
        WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "bundle").text.strip())
        assert driver.find_element(By.ID, "question-label").text == "Prompt"
        assert not driver.find_element(By.ID, "topk").is_displayed()
        assert driver.find_element(By.ID, "max-tokens").get_attribute("value") == "6"
        driver.execute_script("""window.seen = []; new MutationObserver(() => window.seen.push(
            document.getElementById('answer').textContent)).observe(document.getElementById('answer'),
            {childList: true, characterData: true, subtree: true});""")
        driver.find_element(By.ID, "file").send_keys(str(image))
        driver.find_element(By.ID, "question").send_keys("what color is the shape ?")
        driver.find_element(By.ID, "ask").click()
        WebDriverWait(driver, 60).until(lambda d: d.find_element(By.ID, "timing").text or d.find_element(By.ID, "error").text)
        assert driver.find_element(By.ID, "answer").text == want.strip() and not driver.find_element(By.ID, "error").text
        seen = [s for s in driver.execute_script("return window.seen") if s]
        assert len(set(seen)) >= 2 and all(want.startswith(s) for s in seen), seen  # pieces, in order, as they came
        assert "first text after" in driver.find_element(By.ID, "timing").text
        not_an_image = tmp_path / "notes.txt"
        not_an_image.write_text("not an image")
        driver.find_element(By.ID, "file").send_keys(str(not_an_image))
        driver.find_element(By.ID, "ask").click()
        WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "error").text)
        assert "image" in driver.find_element(By.ID, "error").text and not driver.find_element(By.ID, "answer").text
