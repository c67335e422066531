// MathJax 2 (copied from jupyter-server-mathjax by `make docs`, so the site renders
// formulas offline) reads this object as its configuration when it loads. The
// arithmatex extension wraps formulas in \( \) and \[ \] inside class "arithmatex".
window.MathJax = {
  tex2jax: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true,
    ignoreClass: ".*|",
    processClass: "arithmatex",
  },
  messageStyle: "none",
};
