// The attention view of a captioned image, shared by the service's page and the gallery's detail view (the gallery
// serves this file from here): one button per word; hovering, focusing or clicking a word lights up the regions the
// decoder attended to while writing it, as boxes over the image whose strength follows the attention weight.
// Everything from the server is inserted with textContent, never as HTML.
"use strict";

const TOP_REGIONS = 5;      // boxes drawn per word at most
const MIN_SHARE = 0.05;     // ...and only those with at least this share of the word's attention
const LABELLED = 3;         // boxes that get a "word: object (weight)" label
const COLOURS = ["#ffc400", "#00b7ff", "#ff5aaa", "#78e65a", "#ff8c28"];

export class AttentionView {
  constructor({ stage, boxes, caption, attended, alternatives }) {
    Object.assign(this, { stage, boxes, captionEl: caption, attended, alternatives });
    this.image = null;
    this.pinned = null;
  }

  show(image) {
    this.image = image;
    this.pinned = null;
    this.captionEl.replaceChildren();
    image.words.forEach((entry, i) => {
      const word = document.createElement("button");
      word.type = "button";
      word.className = "word";
      word.textContent = entry.word;
      word.dataset.index = String(i);
      word.setAttribute("aria-pressed", "false");
      word.addEventListener("mouseenter", () => this.highlight(i));
      word.addEventListener("focus", () => this.highlight(i));
      word.addEventListener("mouseleave", () => this.highlight(this.pinned));
      word.addEventListener("blur", () => this.highlight(this.pinned));
      word.addEventListener("click", () => this.pin(this.pinned === i ? null : i));
      this.captionEl.append(word, " ");
    });
    if (!image.words.length) this.captionEl.textContent = "(the model wrote an empty caption)";
    this.alternatives.replaceChildren();
    for (const alternative of image.alternatives) {
      const item = document.createElement("li");
      const text = document.createElement("span");
      text.textContent = alternative.caption || "(empty)";
      const score = document.createElement("span");
      score.className = "logprob";
      score.textContent = `log p = ${alternative.logprob.toFixed(2)}`;
      item.append(text, score);
      this.alternatives.append(item);
    }
    this.highlight(null);
  }

  // Returns true when a pinned word was released (Escape then does not close the dialog).
  unpin() {
    if (this.pinned === null) return false;
    this.pin(null);
    return true;
  }

  pin(index) {
    this.pinned = index;
    this.highlight(index);
  }

  // The regions a word attended to most: [{index, weight}], strongest first.
  topRegions(wordIndex) {
    return this.image.words[wordIndex].attention
      .map((weight, index) => ({ index, weight }))
      .sort((a, b) => b.weight - a.weight)
      .slice(0, TOP_REGIONS)
      .filter((region, rank) => rank === 0 || region.weight >= MIN_SHARE);
  }

  highlight(wordIndex) {
    this.boxes.replaceChildren();
    this.attended.replaceChildren();
    for (const el of this.captionEl.querySelectorAll(".word")) {
      const index = Number(el.dataset.index);
      el.classList.toggle("active", index === wordIndex);
      el.setAttribute("aria-pressed", String(this.pinned !== null && index === this.pinned));
    }
    this.stage.classList.toggle("focused", wordIndex !== null);
    if (wordIndex === null || !this.image) return;
    const image = this.image;
    const word = image.words[wordIndex].word;
    const regions = this.topRegions(wordIndex);
    const peak = regions.length ? regions[0].weight : 1;
    // Weakest first, so that the strongest box is drawn on top.
    [...regions].reverse().forEach((region) => {
      const rank = regions.indexOf(region);
      const detected = image.regions[region.index];
      const [x1, y1, x2, y2] = detected.box;
      const box = document.createElement("div");
      box.className = "box";
      box.style.left = `${(100 * x1) / image.width}%`;
      box.style.top = `${(100 * y1) / image.height}%`;
      box.style.width = `${(100 * (x2 - x1)) / image.width}%`;
      box.style.height = `${(100 * (y2 - y1)) / image.height}%`;
      box.style.setProperty("--colour", COLOURS[rank % COLOURS.length]);
      box.style.setProperty("--strength", (0.35 + (0.65 * region.weight) / peak).toFixed(3));
      if (rank < LABELLED) {
        const label = document.createElement("span");
        label.className = "box-label";
        label.textContent = `${word}: ${regionName(detected)} (${region.weight.toFixed(2)})`;
        if (y1 / image.height < 0.07) label.classList.add("inside"); // would be clipped above the image
        box.append(label);
      }
      this.boxes.append(box);
    });
    separateLabels(this.boxes);
    const heading = document.createElement("p");
    heading.className = "attended-title";
    heading.textContent = `While writing “${word}” the decoder looked at:`;
    const list = document.createElement("ul");
    regions.forEach((region, rank) => {
      const item = document.createElement("li");
      item.style.setProperty("--colour", COLOURS[rank % COLOURS.length]);
      item.textContent = `${regionName(image.regions[region.index])} — ${(100 * region.weight).toFixed(1)}%`;
      list.append(item);
    });
    this.attended.append(heading, list);
  }
}

// Push labels down until they stop covering one another; the strongest box's label keeps its place.
function separateLabels(layer) {
  const placed = [];
  [...layer.querySelectorAll(".box-label")].reverse().forEach((label) => {
    let shift = 0;
    for (let tries = 0; tries < 6; tries++) {
      const rect = label.getBoundingClientRect();
      const hit = placed.find((p) => rect.left < p.right && p.left < rect.right && rect.top < p.bottom && p.top < rect.bottom);
      if (!hit) break;
      shift += hit.bottom - rect.top;
      label.style.top = `${shift - 3}px`;
    }
    placed.push(label.getBoundingClientRect());
  });
}

function regionName(region) {
  return [region.attribute, region.object].filter(Boolean).join(" ") || "region";
}
