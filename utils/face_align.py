"""5-point face alignment to the 112x112 ArcFace crop, as the released eval_ijbc.py."""
import cv2
import numpy as np
from skimage.transform import SimilarityTransform

# ArcFace 112x112 template: the 96x112 reference points shifted by +8 px on x.
ARCFACE_REFERENCE = np.array([
    [38.2946, 51.6963],
    [73.5318, 51.5014],
    [56.0252, 71.7366],
    [41.5493, 92.3655],
    [70.7299, 92.2041]], dtype=np.float64)


def reduce_landmarks(landmarks):
    """[5,2] -> itself; [68,2] -> the 5 ArcFace points (eye centres, nose tip, mouth corners)."""
    landmarks = np.asarray(landmarks, dtype=np.float64)
    if landmarks.shape == (5, 2):
        return landmarks
    if landmarks.shape == (68, 2):
        return np.stack([
            landmarks[[36, 39]].mean(0), landmarks[[42, 45]].mean(0),
            landmarks[30], landmarks[48], landmarks[54]])
    raise ValueError(f"landmarks must have shape [5,2] or [68,2], got {list(landmarks.shape)}")


def estimate_norm(landmarks, image_size=112):
    """2x3 similarity matrix (least squares) mapping the landmarks onto the reference for `image_size`."""
    reference = ARCFACE_REFERENCE * (image_size / 112.0)
    transform = SimilarityTransform.from_estimate(reduce_landmarks(landmarks), reference)
    if not transform:  # FailedEstimation is falsy (e.g. all points identical)
        raise ValueError(f"cannot estimate a similarity transform from landmarks {np.asarray(landmarks).tolist()}")
    return transform.params[:2]


def norm_crop(img, landmarks, image_size=112):
    """Warp `img` (HxWxC uint8, any channel order) to the aligned image_size x image_size crop, border 0."""
    matrix = estimate_norm(landmarks, image_size)
    return cv2.warpAffine(img, matrix, (image_size, image_size), borderValue=0.0)
