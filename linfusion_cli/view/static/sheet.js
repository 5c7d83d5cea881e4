// The contact sheet's filter box: hides the cards whose prompt, negative prompt and file name do not contain
// every word typed. Reads data-text attributes only; never builds HTML from a prompt.
(function () {
  "use strict";
  var box = document.getElementById("filter");
  var count = document.getElementById("shown");
  var cards = Array.prototype.slice.call(document.querySelectorAll(".card"));
  function apply() {
    var words = box.value.toLowerCase().split(/\s+/).filter(Boolean);
    var shown = 0;
    cards.forEach(function (card) {
      var text = card.getAttribute("data-text") || "";
      var match = words.every(function (word) { return text.indexOf(word) !== -1; });
      card.hidden = !match;
      if (match) { shown += 1; }
    });
    count.textContent = words.length ? shown + " of " + cards.length + " shown" : "";
  }
  box.addEventListener("input", apply);
  apply();
})();
