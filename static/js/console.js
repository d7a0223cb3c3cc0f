// Console behaviour.  No inline scripts (strict CSP): everything hangs off data attributes.
//   data-copy="#element-id"   copies that element's text; the button's data-copied text
//                             (translated by the template) is shown for a moment.
//   data-confirm="question"   on a form: asks before submitting (htmx forms use hx-confirm).
(function () {
  document.addEventListener("click", async (event) => {
    const button = event.target.closest("[data-copy]");
    if (!button) return;
    const source = document.querySelector(button.getAttribute("data-copy"));
    if (!source) return;
    const text = (source.value !== undefined ? source.value : source.textContent).trim();
    try {
      await navigator.clipboard.writeText(text);
    } catch (error) {
      // Without clipboard permission (http, older browsers): select it for Ctrl+C.
      const range = document.createRange();
      range.selectNodeContents(source);
      const selection = window.getSelection();
      selection.removeAllRanges();
      selection.addRange(range);
    }
    const label = button.textContent;
    button.textContent = button.getAttribute("data-copied") || label;
    setTimeout(() => { button.textContent = label; }, 1500);
  });

  document.addEventListener("submit", (event) => {
    const form = event.target;
    const question = form.getAttribute && form.getAttribute("data-confirm");
    if (question && !window.confirm(question)) {
      event.preventDefault();
    }
  });
})();
