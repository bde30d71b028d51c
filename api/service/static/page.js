// framepool's page: upload a video, show what the chosen model saw. Plain script, no build
// step; every URL is relative to the page, so the service may sit under a path prefix.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const form = $("ask");
  const fileInput = $("file");
  const drop = $("drop");
  const modelSelect = $("model");
  const button = $("go");
  let models = [];
  let limits = null;

  // ------------------------------------------------------------------ small DOM helpers
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined) continue;
      if (k === "class") node.className = v;
      else if (k === "style") node.setAttribute("style", v);
      else node.setAttribute(k, v);
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
    return node;
  }

  const pct = (p) => (100 * p).toFixed(1) + " %";
  const secs = (s) => (s < 0.01 ? s.toFixed(4) : s.toFixed(2)) + " s";
  const mb = (bytes) => parseFloat((bytes / (1024 * 1024)).toFixed(2)) + " MiB";
  const size = (bytes) => (bytes < 1024 * 1024 ? (bytes / 1024).toFixed(1) + " KiB" : mb(bytes));

  // white to dark blue, and a text colour that reads on it (WCAG relative luminance)
  function shade(value, vmax) {
    const t = vmax > 0 ? Math.max(0, Math.min(1, value / vmax)) : 0;
    const low = [0.97, 0.98, 1.0];
    const high = [0.03, 0.19, 0.42];
    const rgb = low.map((c, i) => c + t * (high[i] - c));
    const lin = (c) => (c <= 0.04045 ? c / 12.92 : Math.pow((c + 0.055) / 1.055, 2.4));
    const lum = 0.2126 * lin(rgb[0]) + 0.7152 * lin(rgb[1]) + 0.0722 * lin(rgb[2]);
    const text = (lum + 0.05) ** 2 > 0.05 * 1.05 ? "#000" : "#fff";
    const css = "rgb(" + rgb.map((c) => Math.round(255 * c)).join(",") + ")";
    return { background: css, color: text };
  }

  // ------------------------------------------------------------------ what the service offers
  async function loadModels() {
    try {
      const [m, l] = await Promise.all([fetch("v1/models"), fetch("v1/limits")]);
      if (!m.ok) throw new Error(await reason(m));
      models = (await m.json()).models;
      if (l.ok) limits = await l.json();
    } catch (err) {
      showError("The service's models could not be listed", String(err.message || err));
      return;
    }
    clear(modelSelect);
    for (const model of models) {
      const label = model.id + " (" + model.head + ")" + (model.default ? ", default" : "");
      const option = el("option", { value: model.id }, label);
      if (model.default) option.selected = true;
      modelSelect.append(option);
    }
    describeModel();
    if (limits) {
      $("upload-limit").textContent = "Largest upload: " + mb(limits.max_upload_bytes) + ".";
      const maxFrames = $("max_frames");
      if (limits.max_frames) {
        maxFrames.max = String(limits.max_frames);
        $("max-frames-hint").textContent =
          "at most " + limits.max_frames + "; longer videos are spread over this many frames";
      }
    }
  }

  function selectedModel() {
    return models.find((m) => m.id === modelSelect.value) || null;
  }

  function describeModel() {
    const model = selectedModel();
    if (!model) return;
    const top1 = model.metrics && typeof model.metrics.top1 === "number";
    const parts = [
      model.head + " head on " + model.streams.join(" + "),
      model.classes.length + " classes",
      top1 ? "test top-1 " + pct(model.metrics.top1) : null,
      model.similarity_index ? model.similarity_index + " indexed training videos" : "no similarity index",
    ];
    $("model-info").textContent = parts.filter(Boolean).join("; ");
    const similar = $("similar");
    similar.disabled = !model.similarity_index;
    $("similar-hint").textContent = model.similarity_index ? "0: none" : "this model has no similarity index";
  }

  // ------------------------------------------------------------------ choosing a file
  function showChosen() {
    const file = fileInput.files && fileInput.files[0];
    $("chosen").textContent = file ? "Chosen: " + file.name + " (" + size(file.size) + ")" : "";
  }

  fileInput.addEventListener("change", showChosen);
  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, (event) => {
      event.preventDefault();
      drop.classList.add("over");
    });
  }
  for (const type of ["dragleave", "drop"]) {
    drop.addEventListener(type, () => drop.classList.remove("over"));
  }
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    if (event.dataTransfer && event.dataTransfer.files.length) {
      fileInput.files = event.dataTransfer.files;
      showChosen();
    }
  });
  // a file dropped beside the box is not opened by the browser in place of the page
  for (const type of ["dragover", "drop"]) {
    window.addEventListener(type, (event) => {
      if (!drop.contains(event.target)) event.preventDefault();
    });
  }
  modelSelect.addEventListener("change", describeModel);

  // ------------------------------------------------------------------ errors
  async function reason(response) {
    try {
      const body = await response.json();
      if (body && typeof body.detail === "string") return body.detail;
      return JSON.stringify(body);
    } catch (_) {
      return response.statusText || "no reason given";
    }
  }

  const TITLES = {
    400: "The upload was not understood",
    404: "Not found",
    408: "The upload took too long",
    413: "The video is too large for this service",
    415: "This file is not a video the service can read",
    422: "The video or an option could not be used",
    499: "The request was cancelled",
    503: "The service cannot take this video now",
  };

  let retryTimer = null;

  function showError(title, detail, extra) {
    const box = clear($("error"));
    box.append(el("h2", {}, title), el("p", { id: "error-detail" }, detail));
    if (extra) box.append(extra);
    box.hidden = false;
    $("status").textContent = "";
  }

  async function showRefusal(response, file) {
    const detail = await reason(response);
    const status = response.status;
    const title = (TITLES[status] || "The service answered " + status) + " (HTTP " + status + ")";
    let extra = null;
    if (status === 413 && limits) {
      extra = el("p", {}, "This service takes uploads up to " + mb(limits.max_upload_bytes) +
        " and videos up to " + limits.max_decoded_frames + " frames; " + file.name + " is " +
        size(file.size) + ".");
    } else if (status === 415) {
      extra = el("p", {}, "Send a video file (mp4, mov, mkv, webm, avi, ...).");
    } else if (status === 503) {
      const wait = parseInt(response.headers.get("Retry-After") || "2", 10) || 2;
      const again = el("button", { type: "button", class: "secondary", id: "retry", disabled: "" },
        "Try again");
      const note = el("p", { id: "retry-note" });
      extra = el("div", {}, note, again);
      let left = wait;
      const tick = () => {
        if (left > 0) {
          note.textContent = "It asks to wait " + wait + " s before trying again (" + left + " s left).";
          left -= 1;
          retryTimer = setTimeout(tick, 1000);
        } else {
          note.textContent = "You can try again now.";
          again.disabled = false;
        }
      };
      again.addEventListener("click", () => form.requestSubmit());
      clearTimeout(retryTimer);
      tick();
    }
    const what = el("p", { id: "error-file" }, "File: " + file.name + " (" + size(file.size) + ")");
    showError(title, detail, extra ? el("div", {}, what, extra) : what);
  }

  // ------------------------------------------------------------------ asking
  function options(withModel) {
    const params = new URLSearchParams();
    const model = selectedModel();
    if (withModel && model) params.set("model", model.id);
    for (const name of ["stride", "max_frames"]) {
      const value = $(name).value.trim();
      if (value) params.set(name, value);
    }
    return params;
  }

  function upload(file) {
    const body = new FormData();
    body.append("file", file, file.name);
    return body;
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearTimeout(retryTimer);
    const file = fileInput.files && fileInput.files[0];
    $("error").hidden = true;
    if (!file) {
      showError("No video chosen", "Choose a video file first (or drop one on the box).");
      fileInput.focus();
      return;
    }
    const params = options(true);
    const topK = $("top_k").value.trim();
    if (topK) params.set("top_k", topK);
    const model = selectedModel();
    const similar = parseInt($("similar").value, 10);
    if (model && model.similarity_index && similar > 0) params.set("similar", String(similar));

    button.disabled = true;
    $("results").hidden = true;
    $("status").textContent = "Uploading and classifying " + file.name + "...";
    const started = performance.now();
    try {
      let response;
      try {
        response = await fetch("v1/predict?" + params, { method: "POST", body: upload(file) });
      } catch (err) {
        showError("The service could not be reached", String(err.message || err));
        return;
      }
      if (!response.ok) {
        await showRefusal(response, file);
        return;
      }
      const answer = await response.json();
      renderPrediction(answer, file);
      $("status").textContent = "Classified " + file.name + "; fetching thumbnails of the frames used...";
      const strip = await fetchThumbnails(file);
      renderFrames(answer, strip);
      if ($("attention")) renderAttention(await fetchAttention(file, answer.model), answer);
      const total = (performance.now() - started) / 1000;
      $("status").textContent = "Done: " + file.name + " in " + total.toFixed(2) + " s.";
    } finally {
      button.disabled = false;
    }
  });

  async function fetchThumbnails(file) {
    const params = options(false);
    params.set("count", "12");
    try {
      const response = await fetch("v1/thumbnails?" + params, { method: "POST", body: upload(file) });
      if (!response.ok) return { error: await reason(response) };
      return await response.json();
    } catch (err) {
      return { error: String(err.message || err) };
    }
  }

  async function fetchAttention(file, model) {
    const params = options(false);
    params.set("model", model);
    try {
      const response = await fetch("v1/attention?" + params, { method: "POST", body: upload(file) });
      if (!response.ok) return { error: await reason(response) };
      return await response.json();
    } catch (err) {
      return { error: String(err.message || err) };
    }
  }

  // ------------------------------------------------------------------ showing
  function renderPrediction(answer, file) {
    const frames = answer.frames;
    const used = Object.entries(frames.used).map(([s, n]) => s + " " + n).join(", ");
    const video = answer.video;
    $("summary").textContent =
      file.name + ": " + video.width + "x" + video.height +
      (video.fps ? ", " + video.fps.toFixed(2) + " frames/s" : "") +
      ", " + frames.n_frames + " frames decoded, frame features used: " + used +
      " (stride " + frames.stride + (frames.max_frames ? ", at most " + frames.max_frames : "") +
      "). Model " + answer.model + " (" + answer.head + ").";

    const list = clear($("classes"));
    for (const c of answer.top_k) {
      list.append(el("li", {},
        el("span", { class: "label" }, c.label),
        el("span", { class: "track", "aria-hidden": "true" },
          el("span", { class: "fill", style: "width:" + (100 * c.probability).toFixed(2) + "%" })),
        el("span", { class: "value" }, pct(c.probability))));
    }

    renderBeta(answer);
    renderNeighbours(answer);
    renderTimings(answer.timings, null);
    clear($("frames")).append(el("p", { class: "none" }, "Loading thumbnails..."));
    $("results").hidden = false;
  }

  // node (k, l) of a depth-D pyramid over T frames covers [s, e): the intervals of the head
  function nodeSpan(k, level, T) {
    const parts = 1 << (level - 1);
    const s = Math.floor(((k - 1) * T) / parts);
    const e = Math.min(T, Math.max(Math.floor((k * T) / parts), s + 1));
    return [Math.min(s, T - 1), e];
  }

  function renderBeta(answer) {
    const box = clear($("beta"));
    const beta = answer.beta;
    $("beta-hint").hidden = !beta || !Object.keys(beta).length;
    if (!beta || !Object.keys(beta).length) {
      const model = models.find((m) => m.id === answer.model);
      const maps = model && model.streams.some((s) => s.endsWith("_map"));
      box.append(el("p", { class: "none", id: "no-beta" },
        "The " + answer.head + " head learns no pyramid weights: it weighs the frames it uses " +
        "as its pooling defines, not with a learned beta." +
        (maps ? " It attends over the cells of its feature maps: see below." : "")));
      if (maps) box.append(el("div", { id: "attention" }, el("p", { class: "none" }, "Loading attention...")));
      return;
    }
    let vmax = 0;
    for (const levels of Object.values(beta)) for (const lv of levels) for (const b of lv) vmax = Math.max(vmax, b);
    for (const [stream, levels] of Object.entries(beta)) {
      const T = Math.max(1, answer.frames.used[stream] || 1);
      const figure = el("figure", { class: "pyramid", "data-stream": stream },
        el("figcaption", {}, stream + " (" + T + " frames used)"));
      levels.forEach((nodes, i) => {
        const level = i + 1;
        const cells = el("div", { class: "cells", style: "grid-template-columns:repeat(" + T + ",1fr)" });
        nodes.forEach((b, j) => {
          const [s, e] = nodeSpan(j + 1, level, T);
          const colour = shade(b, vmax);
          const label = "level " + level + ", frames " + (s + 1) + " to " + e + " of " + T +
            " used: beta " + b.toFixed(3);
          cells.append(el("span", {
            class: "cell",
            title: label,
            "aria-label": label,
            style: "grid-column:" + (s + 1) + "/" + (e + 1) + ";background:" + colour.background +
              ";color:" + colour.color,
          }, b.toFixed(2)));
        });
        figure.append(el("div", { class: "level" }, el("span", { class: "lvl" }, "level " + level), cells));
      });
      figure.append(el("p", { class: "axis" }, el("span", {}, "first frame used"),
        el("span", {}, "time →"), el("span", {}, "last frame used")));
      box.append(figure);
    }
  }

  // the head's attention over the cells of every map frame: one small grid per frame, the
  // heaviest cell outlined and named in the caption
  function renderAttention(att, answer) {
    const box = clear($("attention"));
    if (att.error) {
      box.append(el("p", { class: "none" }, "No attention: " + att.error));
      return;
    }
    let vmin = Infinity;
    let vmax = 0;
    for (const frame of att.weights) {
      for (const r of frame) for (const w of r) { vmax = Math.max(vmax, w); vmin = Math.min(vmin, w); }
    }
    const cellsPerFrame = att.weights[0].length * att.weights[0][0].length;
    box.append(el("h4", {}, "Where in the frames the " + answer.head + " head looks"),
      el("p", { class: "hint", id: "attention-scale" }, "Attention over the cells of each map frame " +
        "(rows top to bottom, columns left to right of the centre crop); the heaviest cell is outlined. " +
        "Shades run from the lightest weight of all frames, " + vmin.toFixed(3) + ", to the darkest, " +
        vmax.toFixed(3) + " (even attention would be " + (1 / cellsPerFrame).toFixed(3) + " per cell)."));
    const row = el("div", { class: "maps" });
    att.weights.forEach((grid, i) => {
      let peak = [0, 0];
      grid.forEach((r, y) => r.forEach((w, x) => { if (w > grid[peak[0]][peak[1]]) peak = [y, x]; }));
      const cells = el("div", { class: "map", style: "grid-template-columns:repeat(" + grid[0].length + ",1fr)",
        role: "img", "aria-label": "attention of frame " + att.frames[i] });
      grid.forEach((r, y) => r.forEach((w, x) => {
        const colour = shade(w - vmin, vmax - vmin);
        const isPeak = y === peak[0] && x === peak[1];
        cells.append(el("span", {
          class: isPeak ? "mcell peak" : "mcell",
          title: "row " + (y + 1) + ", column " + (x + 1) + ": " + w.toFixed(3),
          style: "background:" + colour.background,
        }));
      }));
      const best = grid[peak[0]][peak[1]];
      row.append(el("figure", { class: "attn" }, cells, el("figcaption", {},
        "frame " + att.frames[i] + ": heaviest row " + (peak[0] + 1) + ", column " + (peak[1] + 1) +
        " (" + best.toFixed(3) + ")")));
    });
    box.append(row);
  }

  function renderFrames(answer, strip) {
    const box = clear($("frames"));
    if (strip.error) {
      box.append(el("p", { class: "none" }, "No thumbnails: " + strip.error));
      return;
    }
    const row = el("div", { class: "strip" });
    for (const t of strip.thumbnails) {
      const when = t.time === null ? "" : " · " + t.time.toFixed(2) + " s";
      row.append(el("figure", {},
        el("img", { src: t.image, alt: "frame " + t.frame + when }),
        el("figcaption", {}, "frame " + t.frame + when)));
    }
    box.append(
      el("p", { class: "hint" }, strip.used.length + " of " + strip.n_frames +
        " decoded frames used (frames " + strip.used[0] + " to " + strip.used[strip.used.length - 1] +
        "); " + strip.thumbnails.length + " of them shown, evenly spread, in the time order of the weights above."),
      row);
    renderTimings(answer.timings, strip.seconds);
  }

  function renderNeighbours(answer) {
    const box = clear($("neighbours"));
    if (!answer.similar) {
      const model = selectedModel();
      box.append(el("p", { class: "none" }, model && !model.similarity_index
        ? "This model has no similarity index."
        : "Not asked for (nearest training videos: 0)."));
      return;
    }
    const body = el("tbody");
    answer.similar.forEach((n, i) => {
      body.append(el("tr", {}, el("td", { class: "num" }, i + 1), el("td", {}, n.video_id),
        el("td", {}, n.label === null ? "–" : n.label), el("td", { class: "num" }, n.distance.toFixed(3))));
    });
    box.append(el("table", { id: "neighbour-table" },
      el("caption", { class: "hint" }, "cosine distance (1 - cos): 0 is the same direction"),
      el("thead", {}, el("tr", {}, el("th", { scope: "col" }, "#"), el("th", { scope: "col" }, "training video"),
        el("th", { scope: "col" }, "label"), el("th", { scope: "col" }, "distance"))),
      body));
  }

  function renderTimings(timings, thumbnailSeconds) {
    const rows = [
      ["receiving the upload", timings.upload],
      ["waiting for a worker", timings.queue],
      ["decoding, optical flow and features", timings.decode_extract],
      ["pooling head", timings.head],
      ["similarity search", timings.search],
      ["whole prediction request", timings.total],
    ];
    if (thumbnailSeconds !== null) rows.push(["thumbnails (a second request)", thumbnailSeconds]);
    const body = el("tbody");
    for (const [what, s] of rows) body.append(el("tr", {}, el("th", { scope: "row" }, what), el("td", { class: "num" }, secs(s))));
    clear($("timings")).append(el("table", { id: "timing-table" },
      el("thead", {}, el("tr", {}, el("th", { scope: "col" }, "stage"), el("th", { scope: "col" }, "seconds"))), body));
  }

  loadModels();
})();
